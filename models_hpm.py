"""The HPM pretraining network: an MAE whose decoder input also feeds a loss predictor.

With `learning_loss=False` the loss predictor is not built and the network is plain MAE. With
`num_frames` it takes clips (N, 3, T, H, W) through VideoMAE's tubelet embedding (and VideoMAE's
conventions: no class token, fixed 1-D position tables, a bias-free `decoder_embed`, the
per-channel tubelet-normalised target, tube masks); with the loss predictor off that is VideoMAE.
State-dict keys follow the reference implementation, so its checkpoints load strictly.
"""
import argparse
import copy
import json
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models.vision_transformer import Block

from util.errors import UserError
from util.layout import MASK_UNITS, ClipLayout, ImageLayout
from util.losses import absolute_loss_prediction, feature_loss, reconstruction_loss
from util.normalization import IMAGENET, Stats
from util.patches import gather_patches
from util.registry import ModelRegistry
from util.schedules import ema_half_life, hard_patch_alpha, teacher_decay

PRETRAIN_MODELS = ModelRegistry("pretraining")


class HPMOutput(NamedTuple):
    pred: torch.Tensor               # (N, M, p*p*3) reconstruction of the masked patches
    loss_pred: torch.Tensor | None   # (N, M) predicted loss of the masked patches (None for MAE)
    latent: torch.Tensor             # (N, 1 + V, D) encoder output: class token, visible patches
    ids_masked: torch.Tensor         # (N, M) indices of the masked patches, ascending


class HPMLosses(NamedTuple):
    total: torch.Tensor              # reconstruction + loss-prediction objective
    recon: torch.Tensor              # mean squared error over masked patches
    loss_pred: torch.Tensor | None   # relative or absolute objective (None for MAE)
    recon_per_patch: torch.Tensor    # (N, M)


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, eps: float = 1e-6) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=eps)
    return nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])


HARD_UNITS = MASK_UNITS


def token_layout(img_size: int, patch_size: int, in_chans: int, mask_ratio: float, num_frames: int | None,
                 tubelet_size: int, unit: str) -> ImageLayout:
    """The layout of the network's input: images, or (`num_frames`) clips masked in `unit`."""
    if num_frames is None:
        return ImageLayout(img_size, patch_size, in_chans, mask_ratio)
    return ClipLayout(img_size, patch_size, in_chans, mask_ratio, num_frames, tubelet_size, unit)


class MaskedAutoencoderHPM(nn.Module):
    """ViT encoder, reconstructor decoder and (HPM only) a loss-predictor decoder of equal shape.
    What differs between images and clips is asked of `layout` (util.layout), never branched on."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
                 learning_loss: bool = True, relative: bool = True, vis_mask_ratio: float = 0.0,
                 target_dim: int | None = None, num_frames: int | None = None, tubelet_size: int = 2,
                 mask_unit: str | None = None, hard_unit: str = "tube", mask_type: str = "tube",
                 norm_eps: float = 1e-6, decoder_norm_eps: float = 1e-6, grad_checkpointing: bool = False) -> None:
        """`num_frames` (None: images): clips of that many frames, tokenised in `tubelet_size` x
        patch x patch tubelets and masked in `mask_unit` (tube or token; `hard_unit` for HPM and
        `mask_type` (tube or random) for the baseline are its former names, read from older
        checkpoints). `norm_eps` / `decoder_norm_eps`: the LayerNorms' (1e-6 in MAE and VideoMAE;
        other values only to load transformers' models)."""
        super().__init__()
        if hard_unit not in HARD_UNITS or mask_type not in ("tube", "random"):
            raise ValueError(f"hard_unit {hard_unit!r} / mask_type {mask_type!r}: use tube or token / tube or random")
        unit = mask_unit or (hard_unit if learning_loss else {"tube": "tube", "random": "token"}[mask_type])
        self.mask_unit = unit
        self.layout = token_layout(img_size, patch_size, in_chans, mask_ratio, num_frames, tubelet_size, unit)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.learning_loss = learning_loss
        self.relative = relative
        self.vis_mask_ratio = vis_mask_ratio
        self.target_dim = target_dim          # None: pixels; else the width of the feature target
        self.grad_checkpointing = grad_checkpointing
        self.hard_unit, self.mask_type = hard_unit, mask_type   # as built (their unit is the layout's)
        # what the training code reads of the layout, as values
        self.video, self.num_prefix = self.layout.video, self.layout.num_prefix
        self.grid_size, self.num_masked = self.layout.grid_size, self.layout.num_masked
        norm = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = self.layout.embedding(embed_dim)
        num_tokens = self.num_prefix + self.layout.num_patches
        if self.num_prefix:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim), requires_grad=False)
        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, norm_eps)
        self.norm = norm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=self.num_prefix > 0)   # VideoMAE's has none
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_eps)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=decoder_norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, target_dim or self.layout.patch_dim)
        if learning_loss:
            self.decoder_blocks_losspred = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                                                   norm_eps)
            self.decoder_norm_losspred = nn.LayerNorm(decoder_embed_dim, eps=decoder_norm_eps)
            self.decoder_pred_losspred = nn.Linear(decoder_embed_dim, self.layout.patch_dim)
        self.initialize_weights()

    @property
    def masked_per_frame(self) -> int:
        """Clips: masked tokens per temporal position (a tube mask's tubes)."""
        return self.layout.masked_per_frame

    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(self.layout.position_table(self.pos_embed.shape[-1]))
        self.decoder_pos_embed.data.copy_(self.layout.position_table(self.decoder_pos_embed.shape[-1]))
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for token in (getattr(self, "cls_token", None), self.mask_token, getattr(self, "vis_mask_token", None)):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        self.apply(self._init_layer)

    @staticmethod
    def _init_layer(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3); clips (N, 3, T, H, W) -> (N, L, t*p*p*3)"""
        return self.layout.patchify(imgs)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """The inverse of `patchify`."""
        return self.layout.unpatchify(patches)

    def pixel_target(self, imgs: torch.Tensor, stats: Stats = IMAGENET) -> torch.Tensor:
        """What the reconstructor predicts at every token (N, L, P), for inputs normalised with `stats`
        (the layout's: MAE's normalised patches, or VideoMAE's un-normalised tubelets)."""
        return self.layout.pixel_target(imgs, self.norm_pix_loss, stats)

    def random_mask(self, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The mask without a teacher (N, L), uniform in the layout's masking unit."""
        return self.layout.random_mask(batch_size, device, generator)

    def hard_mask(self, pred_loss: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """HPM's mask from the predicted losses (N, L): the hardest units (patches, tubes, tokens) masked."""
        return self.layout.hard_mask(pred_loss, alpha, generator)

    def mask_order(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, L) bool -> (N, L) patch indices: visible ones ascending, then masked ones ascending."""
        return torch.argsort(mask.to(torch.int8), dim=1, stable=True)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """The blocks in turn; with `grad_checkpointing` (while gradients are taken) each block's
        activations are recomputed in the backward pass instead of kept: less memory, one more forward."""
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if checkpointed else blk(x)
        return x

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                        vis_mask: bool | None = None) -> torch.Tensor:
        """(N, 3, H, W) (or clips), visible ids (N, V) or None for all -> (N, prefix + V, D), the prefix
        being the class token (images) or nothing (clips).

        `vis_mask` (default: in training, with a mask) replaces a `vis_mask_ratio` share of the
        visible tokens by `vis_mask_token` (UM-MAE); the teacher's full-image pass asks for it too.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, self.num_prefix:]
        if ids_keep is not None:
            x = gather_patches(x, ids_keep)
        if vis_mask is None:
            vis_mask = self.training and ids_keep is not None
        if vis_mask and self.vis_mask_ratio > 0:
            x = self._replace_visible(x, ids_keep)
        if self.num_prefix:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.norm(self._run(self.blocks, x))

    def _replace_visible(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """UM-MAE: a `vis_mask_ratio` share of the visible tokens becomes `vis_mask_token` + pos."""
        n, v, _ = x.shape
        token = (self.vis_mask_token + self.pos_embed[:, self.num_prefix:]).expand(n, -1, -1)
        if ids_keep is not None:
            token = gather_patches(token, ids_keep)
        num_kept = int(v * (1 - self.vis_mask_ratio))
        replace = torch.argsort(torch.rand(n, v, device=x.device), dim=1).argsort(dim=1) >= num_kept
        return torch.where(replace.unsqueeze(-1), token, x)

    def decoder_input(self, latent: torch.Tensor, ids: torch.Tensor | None, num_visible: int) -> torch.Tensor:
        """[cls (images), visible tokens, mask tokens], each with its decoder position embedding.

        `ids` (N, L) orders patches visible-first (see `mask_order`); None means nothing masked.
        """
        x = self.decoder_embed(latent)
        k = self.num_prefix
        pos = self.decoder_pos_embed[:, k:].expand(x.shape[0], -1, -1)
        if ids is not None:
            pos = gather_patches(pos, ids)
        parts = [x[:, :k] + self.decoder_pos_embed[:, :k], x[:, k:] + pos[:, :num_visible]]
        if ids is not None:
            parts.append(self.mask_token + pos[:, num_visible:])
        return torch.cat(parts, dim=1)

    def forward_decoder(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Reconstructor: (N, prefix + L, D') -> (N, prefix + L - start, P) for tokens from `start` on."""
        x = self._run(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x[:, start:]))

    def forward_loss_predictor(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Loss predictor: (N, prefix + L, D') -> (N, prefix + L - start) predicted losses from `start` on,
        float32 under any autocast: its last layer and the mean run in float32, since the teacher ranks
        these values (bf16's 8 significand bits would tie patches at the cut, and a tie is broken by
        position) and the student's objective compares them."""
        x = self.decoder_norm_losspred(self._run(self.decoder_blocks_losspred, x)[:, start:])
        with torch.autocast(x.device.type, enabled=False):
            return self.decoder_pred_losspred(x.float()).mean(dim=-1)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> HPMOutput:
        """imgs (N, 3, H, W); mask (N, L) bool, True = masked, exactly `num_masked` per row."""
        ids = self.mask_order(mask)
        num_visible = mask.shape[1] - self.num_masked
        latent = self.forward_encoder(imgs, ids[:, :num_visible])
        x = self.decoder_input(latent, ids, num_visible)
        start = self.num_prefix + num_visible
        pred = self.forward_decoder(x, start)
        loss_pred = self.forward_loss_predictor(x, start) if self.learning_loss else None
        return HPMOutput(pred, loss_pred, latent, ids[:, num_visible:])

    @torch.no_grad()
    def teacher_pass(self, imgs: torch.Tensor, losses: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher's view: all patches visible (less the `vis_mask_ratio` share, as in the
        reference). -> predicted losses (N, L) from the loss predictor alone (None unless `losses`),
        and the encoder's output at every patch (N, L, D), the `ema` feature target."""
        latent = self.forward_encoder(imgs, vis_mask=True)
        pred_loss = None
        if losses:
            if not self.learning_loss:
                raise RuntimeError("this model has no loss predictor (built with learning_loss=False)")
            k = self.num_prefix
            pred_loss = self.forward_loss_predictor(self.decoder_input(latent, None, latent.shape[1] - k), k)
        return pred_loss, latent[:, self.num_prefix:]

    def predict_losses(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L) the loss predictor's output with nothing masked."""
        return self.teacher_pass(imgs)[0]

    def forward_loss(self, imgs: torch.Tensor, out: HPMOutput, target_features: torch.Tensor | None = None,
                     stats: Stats = IMAGENET) -> HPMLosses:
        """Reconstruction loss on the masked patches (pixels of inputs normalised with `stats`, or
        `target_features` (N, L, C) of a teacher), plus the loss-prediction objective for HPM, which
        ranks that per-patch loss in the layout's unit (patches, tubes or tokens)."""
        if target_features is not None:
            recon, per_patch = feature_loss(out.pred, gather_patches(target_features, out.ids_masked))
        else:
            target = gather_patches(self.pixel_target(imgs, stats), out.ids_masked)
            norm_pix = self.norm_pix_loss and self.layout.norm_pix_in_loss
            recon, per_patch = reconstruction_loss(out.pred, target, norm_pix)
        if out.loss_pred is None:
            return HPMLosses(recon, recon, None, per_patch)
        pred, target = self.layout.ranking_units(out.loss_pred), self.layout.ranking_units(per_patch)
        objective = (self.layout.relative_objective(pred, target) if self.relative
                     else absolute_loss_prediction(pred, target))
        return HPMLosses(recon + objective, recon, objective, per_patch)


class HPMTeacher:
    """The EMA teacher: a frozen copy of the whole student that predicts which patches are hard
    (and, with `--target ema`, gives the feature targets from the same pass).

    It owns everything about the teacher: its creation from the student, the decay schedule and
    the EMA update after each optimizer step, the full-image pass, the hard-patch mask of an
    epoch (easy to hard), compilation and its state in checkpoints (`teacher`).
    """

    def __init__(self, student: MaskedAutoencoderHPM, epochs: int, compile: bool = False,
                 decay_schedule: Callable[[int], float] = teacher_decay) -> None:
        """`decay_schedule`: epoch -> EMA decay per optimizer step (default: the reference's)."""
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.epochs = epochs
        self.decay_schedule = decay_schedule
        self.num_masked = student.num_masked
        self.has_loss_predictor = student.learning_loss
        self._student_params = list(student.parameters())
        self._params = list(self.model.parameters())
        # static shapes: the training batch never changes (drop_last), and a dynamic graph is slower
        self._pass = torch.compile(self.model.teacher_pass, dynamic=False) if compile else self.model.teacher_pass

    def decay(self, epoch: int) -> float:
        return self.decay_schedule(epoch)

    def alpha(self, epoch: int) -> float:
        """Share of the masked patches chosen as hard in `epoch`."""
        return hard_patch_alpha(epoch, self.epochs)

    def num_hard(self, epoch: int) -> int:
        """Units (patches, tubes or tokens: the layout's) chosen as hard in `epoch`."""
        return self.model.layout.num_hard(self.alpha(epoch)) if self.has_loss_predictor else 0

    def scalars(self, epoch: int) -> dict[str, float]:
        values = {"teacher_decay": self.decay(epoch), "teacher_half_life_steps": ema_half_life(self.decay(epoch))}
        if self.has_loss_predictor:
            values["alpha"] = self.alpha(epoch)
        return values

    @torch.no_grad()
    def update(self, epoch: int) -> None:
        """t = d * t + (1 - d) * s for every tensor, in one fused call."""
        torch._foreach_lerp_(self._params, self._student_params, 1.0 - self.decay(epoch))

    @torch.no_grad()
    def full_pass(self, imgs: torch.Tensor, losses: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(N, 3, H, W) -> predicted losses (N, L) (None unless `losses`), encoder output (N, L, D)."""
        return self._pass(imgs, losses)

    def predict_losses(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.full_pass(imgs)[0]

    def mask(self, imgs: torch.Tensor, epoch: int, generator: torch.Generator | None = None,
             precision: Callable[[], ContextManager] | None = None,
             timer: Callable[[str], ContextManager] | None = None,
             pred_loss: torch.Tensor | None = None) -> torch.Tensor:
        """The epoch's HPM mask (N, L): the int(M * alpha) patches of highest predicted loss, the
        rest uniform. While that number is 0 the mask is uniform and the teacher does not run.
        `pred_loss`: the predicted losses when the caller already ran the teacher's pass."""
        timer = timer or (lambda phase: nullcontext())
        if self.num_hard(epoch) <= 0:
            with timer("masking"):
                return self.model.random_mask(imgs.shape[0], imgs.device, generator)
        if pred_loss is None:
            with timer("teacher"), (precision or nullcontext)():
                pred_loss = self.predict_losses(imgs)
        with timer("masking"):
            return self.model.hard_mask(pred_loss, self.alpha(epoch), generator)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def _decoder512d8b(**kwargs) -> dict:
    return {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, **kwargs}


@PRETRAIN_MODELS.register("mae_vit_tiny_patch4_dec32d2b")
def mae_vit_tiny_patch4(**kwargs) -> MaskedAutoencoderHPM:
    """CPU preset for 32-pixel inputs (the reference vectors' configuration)."""
    cfg = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4,
           "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4, **kwargs}
    return MaskedAutoencoderHPM(**cfg)


@PRETRAIN_MODELS.register("mae_vit_small_patch16")
def mae_vit_small_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderHPM:
    return MaskedAutoencoderHPM(**_decoder512d8b(patch_size=16, embed_dim=384, depth=12, num_heads=6, **kwargs))


@PRETRAIN_MODELS.register("mae_vit_base_patch16")
def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderHPM:
    return MaskedAutoencoderHPM(**_decoder512d8b(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs))


@PRETRAIN_MODELS.register("mae_vit_large_patch16")
def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderHPM:
    return MaskedAutoencoderHPM(**_decoder512d8b(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs))


@PRETRAIN_MODELS.register("mae_vit_huge_patch14")
def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderHPM:
    return MaskedAutoencoderHPM(**_decoder512d8b(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs))


def _videomae(embed_dim: int, depth: int, num_heads: int, decoder_embed_dim: int, decoder_num_heads: int,
              decoder_depth: int, **kwargs) -> MaskedAutoencoderHPM:
    """VideoMAE's network (its scripts' decoder sizes), 16 frames of 224 x 224, tubelets 2 x 16 x 16."""
    cfg = {"img_size": 224, "patch_size": 16, "num_frames": 16, "tubelet_size": 2, "mask_ratio": 0.9,
           "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "decoder_embed_dim": decoder_embed_dim,
           "decoder_depth": decoder_depth, "decoder_num_heads": decoder_num_heads, **kwargs}
    return MaskedAutoencoderHPM(**cfg)


@PRETRAIN_MODELS.register()
def videomae_vit_tiny_patch4(**kwargs) -> MaskedAutoencoderHPM:
    """CPU preset for clips: 16 frames of 32 x 32, tubelets 2 x 4 x 4 (512 tokens)."""
    return _videomae(**{"img_size": 32, "patch_size": 4, **kwargs}, embed_dim=64, depth=2, num_heads=4,
                     decoder_embed_dim=32, decoder_num_heads=4, decoder_depth=2)


@PRETRAIN_MODELS.register()
def videomae_vit_small_patch16(**kwargs) -> MaskedAutoencoderHPM:
    return _videomae(384, 12, 6, 192, 3, 4, **kwargs)


@PRETRAIN_MODELS.register()
def videomae_vit_base_patch16(**kwargs) -> MaskedAutoencoderHPM:
    return _videomae(768, 12, 12, 384, 6, 4, **kwargs)


@PRETRAIN_MODELS.register()
def videomae_vit_large_patch16(**kwargs) -> MaskedAutoencoderHPM:
    return _videomae(1024, 24, 16, 512, 8, 12, **kwargs)


@PRETRAIN_MODELS.register()
def videomae_vit_huge_patch16(**kwargs) -> MaskedAutoencoderHPM:
    return _videomae(1280, 32, 16, 640, 8, 12, **kwargs)


def is_video_model(name: str) -> bool:
    """Whether the pretraining model `name` takes clips (the videomae_* presets)."""
    return name.startswith("videomae_")


def default_mask_ratio(name: str) -> float:
    """MAE's 0.75 for images, VideoMAE's 0.9 for clips."""
    return 0.9 if is_video_model(name) else 0.75


def create_pretrain_model(name: str, **kwargs) -> MaskedAutoencoderHPM:
    return PRETRAIN_MODELS.create(name, **kwargs)


def encoder_name(pretrain_name: str) -> str:
    """The classifier (models_vit) a pretraining model's encoder loads into: mae_vit_base_patch16 and
    mae_vit_base_patch16_dec512d8b -> vit_base_patch16; videomae_vit_base_patch16 -> video_vit_base_patch16."""
    name = re.sub(r"_dec\d+d\d+b$", "", pretrain_name)
    return "video_" + name.removeprefix("videomae_") if is_video_model(name) else name.removeprefix("mae_")


# VideoMAE's presets, by encoder and decoder width: heads (its files do not say)
_VIDEOMAE_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 192: 3, 512: 8, 640: 8}


def _named(ckpt: dict, override: str | None, path: str) -> str:
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    for name in (override, ckpt.get("model_name"), ckpt.get("model") if isinstance(ckpt.get("model"), str) else None,
                 args.get("model")):
        if name:
            return name
    raise UserError(f"{path}: the checkpoint does not name its model; pass --model (e.g. mae_vit_base_patch16)")


def _build(path: str, what: str, state: dict, make: Callable[..., MaskedAutoencoderHPM],
           **kwargs) -> MaskedAutoencoderHPM:
    """The network `make(**kwargs)` with `state` loaded strictly (the fixed position tables and the
    target statistics are the network's own), or a one-line error naming the checkpoint."""
    kwargs["learning_loss"] = "decoder_pred_losspred.weight" in state
    try:
        model = make(**kwargs)
        fixed = {k: v for k, v in model.state_dict().items() if k.endswith("pos_embed")}
        model.load_state_dict({**fixed, **state})
    except (ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0][:160]
        raise UserError(f"{what} {path} does not fit the network it describes ({first})") from None
    return model


def _from_transformers(folder: Path, what: str) -> MaskedAutoencoderHPM:
    """A transformers ViTMAEForPreTraining or VideoMAEForPreTraining folder (config.json + weights)."""
    from safetensors.torch import load_file as load_safetensors

    from util.formats import from_hf_pretraining
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in ("vit_mae", "videomae") or not (folder / "model.safetensors").is_file():
        raise UserError(f"{what} {folder}: not a transformers ViTMAE / VideoMAE folder (config.json model_type "
                        f"{kind!r}, model.safetensors); pass a pretraining checkpoint or such a folder")
    video = kind == "videomae"
    state = from_hf_pretraining(load_safetensors(str(folder / "model.safetensors")), video)
    kwargs = dict(img_size=config["image_size"], patch_size=config["patch_size"], embed_dim=config["hidden_size"],
                  depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                  mlp_ratio=config["intermediate_size"] / config["hidden_size"],
                  decoder_embed_dim=config["decoder_hidden_size"], decoder_depth=config["decoder_num_hidden_layers"],
                  decoder_num_heads=config["decoder_num_attention_heads"],
                  norm_pix_loss=config.get("norm_pix_loss", False), norm_eps=config["layer_norm_eps"])
    if video:   # its decoder's final LayerNorm keeps torch's default eps
        kwargs.update(num_frames=config["num_frames"], tubelet_size=config["tubelet_size"], mask_ratio=0.9,
                      decoder_norm_eps=1e-5)
    else:
        kwargs.update(mask_ratio=config.get("mask_ratio", 0.75), decoder_norm_eps=config["layer_norm_eps"])
    return _build(str(folder), what, state, MaskedAutoencoderHPM, **kwargs)


def load_pretrain_model(path: str, model: str | None = None, teacher: bool = False, what: str = "--checkpoint",
                        **overrides) -> MaskedAutoencoderHPM:
    """Build and load any supported pretraining checkpoint, images or clips: ours (student, or
    `teacher`), the reference HPM's, MAE's full pretraining file, VideoMAE's own pretraining file, and
    transformers ViTMAEForPreTraining / VideoMAEForPreTraining folders. `model` names the preset where
    the file does not; `overrides` (e.g. mask_ratio, num_frames, img_size) go to the network."""
    from util.checkpoint import clean_state_dict, load_file, pick_state_dict
    from util.formats import from_videomae
    folder = Path(path)
    if folder.is_dir():
        return _from_transformers(folder, what)
    ckpt = load_file(path, what)
    if "encoder.patch_embed.proj.weight" in ckpt.get("model", {}):   # VideoMAE's own file: 16 x 224 unless told
        state = from_videomae(ckpt["model"])
        proj, dim = state["patch_embed.proj.weight"], state["decoder_embed.weight"].shape[0]
        kwargs = dict(num_frames=16, img_size=224, patch_size=proj.shape[-1], tubelet_size=proj.shape[2],
                      embed_dim=proj.shape[0],
                      num_heads=_VIDEOMAE_HEADS.get(proj.shape[0], max(1, proj.shape[0] // 64)),
                      depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                      decoder_embed_dim=dim, decoder_num_heads=_VIDEOMAE_HEADS.get(dim, max(1, dim // 64)),
                      decoder_depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
                      mask_ratio=0.9)
        return _build(path, what, state, MaskedAutoencoderHPM, **{**kwargs, **overrides})
    name = _named(ckpt, model, path)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    state = clean_state_dict(pick_state_dict(ckpt, teacher, path, what), keep_decoders=True)
    if "decoder_pred.weight" not in state:
        raise UserError(f"{what} {path}: no reconstruction decoder (a fine-tuned or exported encoder?); pass a "
                        f"pretraining checkpoint")
    probe = create_pretrain_model(name, learning_loss=False, **overrides)
    pred_width = state["decoder_pred.weight"].shape[0]
    kwargs = dict(norm_pix_loss=bool(args.get("norm_pix_loss", False)), relative=bool(args.get("relative", True)),
                  vis_mask_ratio=float(args.get("vis_mask_ratio", 0.0)),
                  target_dim=None if pred_width == probe.decoder_pred.weight.shape[0] else pred_width)
    for key in ("mask_ratio", "mask_unit", "hard_unit", "mask_type"):
        if args.get(key) is not None:
            kwargs[key] = args[key]
    temporal = probe.layout.num_patches // probe.grid_size ** 2   # token positions in time: 1 for images
    grid = round(((state["pos_embed"].shape[1] - probe.num_prefix) / temporal) ** 0.5)
    kwargs.update(img_size=grid * probe.patch_size, **overrides)
    return _build(path, what, state, lambda **kw: create_pretrain_model(name, **kw), **kwargs)
