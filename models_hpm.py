"""The HPM pretraining network: an MAE whose decoder input also feeds a loss predictor.

With `learning_loss=False` the loss predictor is not built and the network is plain MAE.
State-dict keys follow the reference implementation, so its checkpoints load strictly.
"""
import copy
import re
from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.losses import absolute_loss_prediction, feature_loss, reconstruction_loss, relative_loss_prediction
from util.masking import hard_patch_mask, num_masked_patches, random_mask
from util.patches import gather_patches, patchify, unpatchify
from util.pos_embed import get_2d_sincos_pos_embed
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


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])


class MaskedAutoencoderHPM(nn.Module):
    """ViT encoder, reconstructor decoder and (HPM only) a loss-predictor decoder of equal shape."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
                 learning_loss: bool = True, relative: bool = True, vis_mask_ratio: float = 0.0,
                 target_dim: int | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not divisible by the patch size {patch_size}: "
                             f"use a multiple of {patch_size} (--input_size)")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.learning_loss = learning_loss
        self.relative = relative
        self.vis_mask_ratio = vis_mask_ratio
        self.target_dim = target_dim          # None: pixels; else the width of the feature target
        norm = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size[0]
        num_patches = self.patch_embed.num_patches
        self.num_masked = num_masked_patches(num_patches, mask_ratio)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = norm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        patch_dim = patch_size * patch_size * in_chans
        self.decoder_blocks = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, target_dim or patch_dim)
        if learning_loss:
            self.decoder_blocks_losspred = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
            self.decoder_norm_losspred = norm(decoder_embed_dim)
            self.decoder_pred_losspred = nn.Linear(decoder_embed_dim, patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size))
        self.decoder_pos_embed.data.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size))
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for token in (self.cls_token, self.mask_token, getattr(self, "vis_mask_token", None)):
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
        """(N, 3, H, W) -> (N, L, p*p*3)"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W)"""
        return unpatchify(patches, self.patch_size, self.in_chans)

    def mask_order(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, L) bool -> (N, L) patch indices: visible ones ascending, then masked ones ascending."""
        return torch.argsort(mask.to(torch.int8), dim=1, stable=True)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                        vis_mask: bool | None = None) -> torch.Tensor:
        """(N, 3, H, W), visible ids (N, V) or None for all -> (N, 1 + V, D).

        `vis_mask` (default: in training, with a mask) replaces a `vis_mask_ratio` share of the
        visible tokens by `vis_mask_token` (UM-MAE); the teacher's full-image pass asks for it too.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = gather_patches(x, ids_keep)
        if vis_mask is None:
            vis_mask = self.training and ids_keep is not None
        if vis_mask and self.vis_mask_ratio > 0:
            x = self._replace_visible(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _replace_visible(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """UM-MAE: a `vis_mask_ratio` share of the visible tokens becomes `vis_mask_token` + pos."""
        n, v, _ = x.shape
        token = (self.vis_mask_token + self.pos_embed[:, 1:]).expand(n, -1, -1)
        if ids_keep is not None:
            token = gather_patches(token, ids_keep)
        num_kept = int(v * (1 - self.vis_mask_ratio))
        replace = torch.argsort(torch.rand(n, v, device=x.device), dim=1).argsort(dim=1) >= num_kept
        return torch.where(replace.unsqueeze(-1), token, x)

    def decoder_input(self, latent: torch.Tensor, ids: torch.Tensor | None, num_visible: int) -> torch.Tensor:
        """[cls, visible tokens, mask tokens], each with its decoder position embedding.

        `ids` (N, L) orders patches visible-first (see `mask_order`); None means nothing masked.
        """
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed[:, 1:].expand(x.shape[0], -1, -1)
        if ids is not None:
            pos = gather_patches(pos, ids)
        parts = [x[:, :1] + self.decoder_pos_embed[:, :1], x[:, 1:] + pos[:, :num_visible]]
        if ids is not None:
            parts.append(self.mask_token + pos[:, num_visible:])
        return torch.cat(parts, dim=1)

    def forward_decoder(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Reconstructor: (N, 1 + L, D') -> (N, 1 + L - start, p*p*3) for tokens from `start` on."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x[:, start:]))

    def forward_loss_predictor(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Loss predictor: (N, 1 + L, D') -> (N, 1 + L - start) predicted losses from `start` on."""
        for blk in self.decoder_blocks_losspred:
            x = blk(x)
        return self.decoder_pred_losspred(self.decoder_norm_losspred(x[:, start:])).mean(dim=-1)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> HPMOutput:
        """imgs (N, 3, H, W); mask (N, L) bool, True = masked, exactly `num_masked` per row."""
        ids = self.mask_order(mask)
        num_visible = mask.shape[1] - self.num_masked
        latent = self.forward_encoder(imgs, ids[:, :num_visible])
        x = self.decoder_input(latent, ids, num_visible)
        pred = self.forward_decoder(x, 1 + num_visible)
        loss_pred = self.forward_loss_predictor(x, 1 + num_visible) if self.learning_loss else None
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
            pred_loss = self.forward_loss_predictor(self.decoder_input(latent, None, latent.shape[1] - 1), 1)
        return pred_loss, latent[:, 1:]

    def predict_losses(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L) the loss predictor's output with nothing masked."""
        return self.teacher_pass(imgs)[0]

    def forward_loss(self, imgs: torch.Tensor, out: HPMOutput, target_features: torch.Tensor | None = None) -> HPMLosses:
        """Reconstruction loss on the masked patches (pixels, or `target_features` (N, L, C) of a
        teacher), plus the loss-prediction objective for HPM, which ranks that per-patch loss."""
        if target_features is not None:
            recon, per_patch = feature_loss(out.pred, gather_patches(target_features, out.ids_masked))
        else:
            recon, per_patch = reconstruction_loss(out.pred, gather_patches(self.patchify(imgs), out.ids_masked),
                                                   self.norm_pix_loss)
        if out.loss_pred is None:
            return HPMLosses(recon, recon, None, per_patch)
        objective = relative_loss_prediction if self.relative else absolute_loss_prediction
        loss_pred = objective(out.loss_pred, per_patch)
        return HPMLosses(recon + loss_pred, recon, loss_pred, per_patch)


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
        return int(self.num_masked * self.alpha(epoch)) if self.has_loss_predictor else 0

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
        n, num_patches = imgs.shape[0], self.model.patch_embed.num_patches
        if self.num_hard(epoch) <= 0:
            with timer("masking"):
                return random_mask(n, num_patches, self.num_masked, device=imgs.device, generator=generator)
        if pred_loss is None:
            with timer("teacher"), (precision or nullcontext)():
                pred_loss = self.predict_losses(imgs)
        with timer("masking"):
            return hard_patch_mask(pred_loss, self.num_masked, self.alpha(epoch), generator=generator)

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


def create_pretrain_model(name: str, **kwargs) -> MaskedAutoencoderHPM:
    return PRETRAIN_MODELS.create(name, **kwargs)


def encoder_name(pretrain_name: str) -> str:
    """The classifier (models_vit) a pretraining model's encoder loads into: mae_vit_base_patch16 and
    mae_vit_base_patch16_dec512d8b -> vit_base_patch16."""
    return re.sub(r"_dec\d+d\d+b$", "", pretrain_name).removeprefix("mae_")
