"""The pretraining step (HPM or MAE) for the shared loop, the objects it trains, and the
reconstruction picture for tensorboard.

One batch: loader -> `PretrainTask.forward` -> the teacher's mask (HPM) or the mask policy (MAE)
-> the student (models_hpm) -> its losses -> the loop's optimizer step -> the teacher's update.
"""
import argparse
import logging
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid

import models_hpm
from engine import Timer, no_timer
from models_hpm import HPMTeacher, MaskedAutoencoderHPM
from util.args import (
    DataDefault,
    RenamedFlag,
    check_common,
    data_parser,
    make_parser,
    model_parser,
    resolve_data_defaults,
    runtime_parser,
    training_parser,
    with_data_defaults,
)
from util.checkpoint import file_sha256
from util.colormap import heat_colors, normalise_per_image
from util.errors import UserError
from util.faults import fault_point
from util.gpu_augment import GpuPretrainAugment
from util.layout import MASK_UNITS
from util.normalization import IMAGENET, Stats
from util.patches import gather_patches
from util.precision import autocast
from util.schedules import teacher_decay, teacher_decay_per_step
from util.targets import FrozenTarget
from util.video import normalise_clips

log = logging.getLogger("hpm")


def hpm_parser() -> argparse.ArgumentParser:
    """The pretraining flags (parent of main_pretrain's parser and the benchmark's)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("HPM")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="share of patches masked (default: 0.75 for images, 0.9 for clips, VideoMAE's)")
    g.add_argument("--norm", choices=["imagenet", "dataset"], default="imagenet",
                   help="normalise with ImageNet's mean/std (the reference) or the training set's own, "
                        "computed at the start (--mean/--std give explicit values)")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=False,
                   help="per-patch normalised pixel targets")
    g.add_argument("--learning_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="HPM: loss predictor + EMA teacher choosing hard patches; off = MAE baseline")
    g.add_argument("--relative", action=argparse.BooleanOptionalAction, default=True,
                   help="relative (ranking) loss-prediction objective; off = absolute (MSE) objective")
    g.add_argument("--teacher_decay_unit", choices=["epoch", "step"], default="epoch",
                   help="the EMA teacher's decay: epoch = the reference's, 0.999 per step rising to 0.9999 over 100 "
                        "epochs whatever an epoch's length; step = the same shape with the EMA half-life measured in "
                        "epochs (--teacher_half_life), so that it scales with the steps per epoch: for short runs "
                        "and small datasets")
    g.add_argument("--teacher_half_life", type=float, default=None,
                   help="with --teacher_decay_unit step: the teacher's EMA half-life at epoch 0, in epochs "
                        "(default: 1, what the reference's 0.999 per step is on ImageNet)")
    g.add_argument("--mask_regular", action="store_true", help="MAE mode: UM-MAE 2x2 regular mask")
    g.add_argument("--mask_block", action="store_true", help="MAE mode: one visible square, the rest masked")
    g.add_argument("--vis_mask_ratio", type=float, default=0.0,
                   help="UM-MAE: share of visible tokens replaced by a learned token in the encoder")
    g.add_argument("--target", choices=["pixel", "ema", "clip", "dino"], default="pixel",
                   help="reconstruction target: pixels, or features of the EMA teacher's encoder, of a frozen "
                        "CLIP or DINO ViT (the reference's --learn_feature_loss)")
    g.add_argument("--target_model", type=str, default=None,
                   help="timm name of the frozen target model (default: vit_base_patch16_clip_224.openai for "
                        "clip, vit_base_patch16_224.dino for dino)")
    g.add_argument("--target_checkpoint", type=str, default=None,
                   help="local weights file of the frozen target model (.pth or .safetensors)")
    g.add_argument("--gpu_decode", action="store_true",
                   help="decode the JPEGs and augment (crop, flip, normalise) on the device instead of in the "
                        "loader's workers: for when the CPU loader is the bottleneck")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward pass instead of keeping "
                        "them: far less memory (video, ViT-L/H) for about one more forward pass; the same losses")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher: faster steps after a one-time compile")
    g = p.add_argument_group("video (the videomae_* models)")
    g.add_argument("--num_frames", type=int, default=16, help="frames per clip")
    g.add_argument("--tubelet_size", type=int, default=2, help="frames per tubelet (the Conv3d's temporal kernel)")
    g.add_argument("--sampling_rate", type=int, default=4,
                   help="a clip takes every N-th frame of a video (VideoMAE: 4 for Kinetics-400, 2 for SSv2)")
    g.add_argument("--mask_unit", choices=MASK_UNITS, default="tube",
                   help="what clips are masked in, for HPM and the VideoMAE baseline alike: tube (VideoMAE's tube "
                        "mask; HPM ranks each tube by the teacher's predicted losses averaged over time, so no masked "
                        "patch shows through its neighbours in time) or token (uniform per token; HPM ranks every "
                        "token: the image method on the longer sequence); the ranking objective uses the same unit")
    g.add_argument("--hard_unit", action=RenamedFlag, dest="mask_unit", choices=MASK_UNITS, help=argparse.SUPPRESS)
    g.add_argument("--mask_type", action=RenamedFlag, dest="mask_unit", choices=["tube", "random"],
                   renamed={"random": "token"}, help=argparse.SUPPRESS)
    g = p.add_argument_group("run")
    g.add_argument("--experiment", type=str, default=None,
                   help="name of the run: outputs go to output_dir/<experiment>")
    return p


def pretrain_parents() -> list[argparse.ArgumentParser]:
    """Every flag group of main_pretrain.py."""
    return [model_parser(models_hpm.PRETRAIN_MODELS.names(), "mae_vit_tiny_patch4"), data_parser(),
            training_parser(), runtime_parser(), hpm_parser()]


# The built-in data's values finish a run in minutes on a CPU; on a --data_path the paper's recipe (its
# shortest row, 200 epochs) for images and VideoMAE's (800 epochs, normalised targets, no clipping) for clips.
PRETRAIN_DEFAULTS = {
    "blr": DataDefault(1.5e-3, 1.5e-4),
    "epochs": DataDefault(40, 200, clips=800),
    "warmup_epochs": DataDefault(5, 40),
    "clip_grad": DataDefault(5.0, 5.0, clips=0.0),
    "norm_pix_loss": DataDefault(False, False, clips=True),
}


def pretrain_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """main_pretrain.py's parser (also what main_ablation.py passes through to every run)."""
    return with_data_defaults(make_parser("HPM pretraining", pretrain_parents(), add_help), PRETRAIN_DEFAULTS)


def check_pretrain_args(args: argparse.Namespace) -> list[str]:
    """What main_pretrain checks before touching anything: each failure is one line naming the flag.
    Fills in the data-dependent defaults first and returns them as flags (for the start line)."""
    video = models_hpm.is_video_model(args.model)
    filled = resolve_data_defaults(args, PRETRAIN_DEFAULTS, video)
    check_common(args)
    if args.mask_ratio is None:
        args.mask_ratio = models_hpm.default_mask_ratio(args.model)
    if not video:
        changed = [f for f, default in (("num_frames", 16), ("tubelet_size", 2), ("sampling_rate", 4),
                                        ("mask_unit", "tube")) if getattr(args, f) != default]
        if changed:
            raise UserError(f"--{changed[0]} is for clips, but --model {args.model} takes images: use a videomae_* "
                            f"model, or drop --{changed[0]}")
    else:
        for flag in ("mask_regular", "mask_block", "gpu_decode"):
            if getattr(args, flag):
                raise UserError(f"--{flag} is for images, but --model {args.model} takes clips: drop --{flag}")
        if args.target in ("clip", "dino"):
            raise UserError(f"--target {args.target} is an image model, but --model {args.model} takes clips: use "
                            f"--target pixel or ema")
        if args.num_frames < 1 or args.num_frames % args.tubelet_size:
            raise UserError(f"--num_frames {args.num_frames} must be a positive multiple of --tubelet_size "
                            f"{args.tubelet_size}")
        if args.sampling_rate < 1:
            raise UserError(f"--sampling_rate {args.sampling_rate} must be at least 1")
    if not 0.0 < args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio {args.mask_ratio} must lie in (0, 1), e.g. 0.75")
    if not 0.0 <= args.vis_mask_ratio < 1.0:
        raise UserError(f"--vis_mask_ratio {args.vis_mask_ratio} must lie in [0, 1)")
    if args.learning_loss and (args.mask_regular or args.mask_block):
        raise UserError("--mask_regular/--mask_block choose the MAE baseline's mask, but HPM's masks come "
                        "from its teacher: add --no-learning_loss, or drop the mask flag")
    if args.teacher_half_life is not None and args.teacher_decay_unit != "step":
        raise UserError("--teacher_half_life sets the half-life of --teacher_decay_unit step: add "
                        "--teacher_decay_unit step, or drop --teacher_half_life")
    if args.teacher_half_life is not None and args.teacher_half_life <= 0:
        raise UserError(f"--teacher_half_life {args.teacher_half_life} must be positive (in epochs, e.g. 1)")
    if args.teacher_decay_unit == "step" and not has_teacher(args):
        raise UserError("--teacher_decay_unit step sets the EMA teacher's schedule, but MAE with pixel targets has "
                        "no teacher: drop it, or use HPM (--learning_loss) or --target ema")
    if args.mask_regular and args.mask_block:
        raise UserError("--mask_regular and --mask_block exclude each other: pick one")
    if args.mask_regular and args.mask_ratio != 0.75:
        raise UserError(f"--mask_regular keeps one patch of each 2x2 cell, so it needs --mask_ratio 0.75 "
                        f"(got {args.mask_ratio})")
    return filled


def build_student(args: argparse.Namespace, target_dim: int | None = None) -> MaskedAutoencoderHPM:
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else models_hpm.default_mask_ratio(args.model)
    kwargs = dict(mask_ratio=mask_ratio, norm_pix_loss=args.norm_pix_loss, learning_loss=args.learning_loss,
                  relative=args.relative, vis_mask_ratio=args.vis_mask_ratio, target_dim=target_dim,
                  grad_checkpointing=args.grad_checkpointing)
    if models_hpm.is_video_model(args.model):
        kwargs.update(num_frames=args.num_frames, tubelet_size=args.tubelet_size, mask_unit=args.mask_unit)
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    try:
        return models_hpm.create_pretrain_model(args.model, **kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def has_teacher(args: argparse.Namespace) -> bool:
    """HPM's teacher chooses the masks; an EMA teacher also gives `--target ema`'s features."""
    return args.learning_loss or args.target == "ema"


def mask_kind(args: argparse.Namespace) -> str:
    """The MAE baseline's mask policy, from its flags (HPM's masks come from the teacher)."""
    return "regular" if args.mask_regular else "block" if args.mask_block else "random"


def teacher_schedule(args: argparse.Namespace, steps_per_epoch: int | None) -> Callable[[int], float]:
    """Epoch -> the teacher's EMA decay per optimizer step, as --teacher_decay_unit chooses."""
    if args.teacher_decay_unit == "epoch":
        return teacher_decay
    if steps_per_epoch is None:
        raise ValueError("--teacher_decay_unit step needs the number of optimizer steps per epoch")
    return partial(teacher_decay_per_step, steps_per_epoch=max(steps_per_epoch, 1),
                   half_life_epochs=args.teacher_half_life or 1.0)


def build_target(args: argparse.Namespace) -> tuple[FrozenTarget | None, int | None]:
    """The frozen external target model (clip, dino) and the target's width (None for pixels)."""
    with torch.device("meta"):
        probe = build_student(args)
    if args.target == "ema":
        return None, probe.pos_embed.shape[-1]
    if args.target == "pixel":
        return None, None
    frozen = FrozenTarget(args.target, args.target_model, args.target_checkpoint, probe.patch_embed.img_size[0],
                          probe.patch_size)
    args.target_checkpoint_sha256 = file_sha256(args.target_checkpoint)
    return frozen, frozen.dim


class PretrainTask:
    """HPM (a teacher chooses the masks) or MAE (no teacher, a mask policy does); what is
    reconstructed: pixels, or features of the EMA teacher (`ema`) or of a frozen model (`clip`, `dino`)."""

    objective = "total"
    finite_losses = {"recon": "reconstruction", "loss_pred": "loss-prediction"}
    score_key = None

    def __init__(self, student: MaskedAutoencoderHPM, args: argparse.Namespace, device: torch.device,
                 amp_dtype: torch.dtype | None, world_size: int = 1, preview: torch.Tensor | None = None,
                 stats: Stats = IMAGENET, frozen_target: FrozenTarget | None = None,
                 steps_per_epoch: int | None = None) -> None:
        """`steps_per_epoch`: optimizer steps per epoch (what --teacher_decay_unit step scales with)."""
        self.student = student
        self.hpm, self.target = args.learning_loss, args.target
        self.teacher = None
        if has_teacher(args):
            self.teacher = HPMTeacher(student, args.epochs, args.compile, teacher_schedule(args, steps_per_epoch))
        self.frozen_target = frozen_target.to(device) if frozen_target is not None else None
        try:   # the MAE baseline's masks (HPM's come from the teacher), as the network's layout draws them
            self.mask_policy = student.layout.mask_policy(mask_kind(args))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.device, self.amp_dtype, self.seed = device, amp_dtype, args.seed
        self.mask_generator = torch.Generator(device=device)
        self.generators: tuple[torch.Generator, ...] = (self.mask_generator,)
        self.gpu_augment = None
        if args.gpu_decode:
            self.gpu_augment = GpuPretrainAugment(student.patch_embed.img_size[0], device, stats,
                                                  skip_bad_images=args.bad_images == "skip")
            self.augment_generator = torch.Generator(device=device)   # flips, on the device
            self.box_generator = torch.Generator()                     # crop boxes, on the host
            self.generators += (self.augment_generator, self.box_generator)
        model: nn.Module = student
        if world_size > 1:   # the student's buffers are constants (position tables, pixel statistics), the
            # same on every rank: nothing to re-broadcast each step
            model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                            broadcast_buffers=False)
        self.model = torch.compile(model, dynamic=False) if args.compile else model
        self.preview, self.stats = preview, stats
        self.num_parameters = sum(p.numel() for p in student.parameters() if p.requires_grad)

    @property
    def name(self) -> str:
        return ("HPM" if self.hpm else "MAE") + ("" if self.target == "pixel" else f" with {self.target} targets")

    def train(self) -> None:
        self.model.train()

    def precision(self):
        return autocast(self.device, self.amp_dtype)

    def mask(self, imgs: torch.Tensor, epoch: int, generator: torch.Generator, timer: Timer = no_timer,
             pred_loss: torch.Tensor | None = None) -> torch.Tensor:
        if self.hpm:
            return self.teacher.mask(imgs, epoch, generator, self.precision, timer, pred_loss)
        with timer("masking"):
            return self.mask_policy(imgs.shape[0], imgs.device, generator)

    def targets(self, imgs: torch.Tensor, epoch: int, timer: Timer = no_timer):
        """The feature targets (N, L, C) or None for pixels, and the teacher's predicted losses when
        the same pass gave them (`ema`)."""
        if self.target == "ema":
            with timer("teacher"), self.precision():
                pred_loss, features = self.teacher.full_pass(imgs, losses=self.hpm and self.teacher.num_hard(epoch) > 0)
            return features, pred_loss
        if self.frozen_target is not None:
            with timer("target"), self.precision():
                return self.frozen_target(imgs), None
        return None, None

    def forward(self, batch, epoch: int, timer: Timer = no_timer) -> dict[str, torch.Tensor]:
        if self.gpu_augment is not None:
            with timer("augment"):
                imgs = self.gpu_augment(self.gpu_augment.decode(batch[0]), self.augment_generator,
                                        self.box_generator)
        else:
            imgs = batch[0].to(self.device, non_blocking=True)
            if imgs.dtype == torch.uint8:   # clips leave the loader's workers as bytes, normalised here
                imgs = normalise_clips(imgs, self.stats)
        features, pred_loss = self.targets(imgs, epoch, timer)
        mask = self.mask(imgs, epoch, self.mask_generator, timer, pred_loss)
        with timer("forward"), self.precision():
            losses = self.student.forward_loss(imgs, self.model(imgs, mask), features, self.stats)
        values = {"total": losses.total, "recon": losses.recon}
        if losses.loss_pred is not None:
            values["loss_pred"] = losses.loss_pred
        return values

    def after_optimizer_step(self, epoch: int, timer: Timer = no_timer) -> None:
        if self.teacher is not None:
            with timer("ema"):
                self.teacher.update(epoch)

    def scalars(self, epoch: int) -> dict[str, float]:
        return self.teacher.scalars(epoch) if self.teacher is not None else {}

    def states(self) -> dict:
        return {"model": self.student, "teacher": self.teacher}

    def end_epoch(self, epoch: int, writer) -> dict:
        """The picture is an extra: the epoch is already saved, and a failure here is only a warning."""
        if writer is not None and self.preview is not None:
            try:
                self.log_images(writer, epoch)
            except Exception as exc:   # noqa: BLE001 - nothing optional may stop a training run
                log.warning(f"the reconstruction picture of epoch {epoch} failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training goes on")
        return {"n_parameters": self.num_parameters}

    def describe(self, record: dict) -> str:
        pred = f", loss_pred {record['train_loss_pred']:.4f}" if "train_loss_pred" in record else ""
        return (f"epoch {record['epoch']} done: recon {record['train_recon']:.4f}{pred}, "
                f"total {record['train_total']:.4f}")

    def log_images(self, writer, epoch: int) -> None:
        """The same images and mask seed every epoch, masked as this epoch's training masks them."""
        fault_point("picture")
        imgs = self.preview
        pred_loss = None
        if self.hpm:   # the eager teacher: the compiled pass is kept to the training batch's shape
            with self.precision():
                pred_loss = self.teacher.model.predict_losses(imgs).float()
        mask = self.mask(imgs, epoch, torch.Generator(device=imgs.device).manual_seed(self.seed), pred_loss=pred_loss)
        writer.add_image("reconstruction", reconstruction_grid(self.student, imgs, mask, pred_loss, self.stats), epoch)
        writer.flush()


def make_optimizer(student: MaskedAutoencoderHPM, args: argparse.Namespace,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.95), no weight decay on 1-D parameters and biases."""
    return torch.optim.AdamW(param_groups_weight_decay(student, args.weight_decay), lr=args.lr,
                             betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))


@torch.no_grad()
def reconstruction_rows(student: MaskedAutoencoderHPM, imgs: torch.Tensor, mask: torch.Tensor,
                        stats: Stats = IMAGENET) -> list[torch.Tensor]:
    """Input, masked input and reconstruction (visible patches pasted back; with norm_pix_loss the
    prediction un-normalised per patch first), each un-normalised with the dataset statistics to
    (N, 3, H, W) in [0, 1]; no reconstruction for feature targets."""
    was_training = student.training
    student.eval()
    out = student(imgs, mask)
    student.train(was_training)
    target = student.patchify(imgs)
    mean, std = stats.tensors(imgs.device, 4)
    if student.target_dim is not None:
        rows = [imgs, student.unpatchify(target * (~mask).unsqueeze(-1))]
        return [(r.float() * std + mean).clamp(0, 1) for r in rows]
    pred = out.pred.float()
    if student.norm_pix_loss:   # the prediction is per-patch standardised: back to the patch's own scale
        masked_target = gather_patches(target, out.ids_masked).float()
        patch_mean = masked_target.mean(-1, keepdim=True)
        patch_std = (masked_target.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * patch_std + patch_mean
    recon = target.clone().scatter_(1, out.ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]), pred)
    rows = [imgs, student.unpatchify(target * (~mask).unsqueeze(-1)), student.unpatchify(recon)]
    return [(r.float() * std + mean).clamp(0, 1) for r in rows]


@torch.no_grad()
def clip_rows(student: MaskedAutoencoderHPM, clips: torch.Tensor, mask: torch.Tensor, pred_loss: torch.Tensor | None,
              stats: Stats = IMAGENET, every: int = 2) -> list[torch.Tensor]:
    """The first clip, every `every`-th frame side by side: input, masked input (tubes visible),
    reconstruction (visible tubelets pasted back; norm-pix predictions on each tubelet channel's own
    scale), and the teacher's predicted-loss map of each frame's tubelets. Rows (frames, 3, H, W)."""
    was_training = student.training
    student.eval()
    out = student(clips[:1], mask[:1])
    student.train(was_training)
    mean, std = stats.tensors(clips.device, 5)   # what normalised these clips
    pixels = (clips[:1].float() * std + mean).clamp(0, 1)
    tubelets = student.patchify(pixels)
    visible = (~mask[:1]).unsqueeze(-1)
    rows = [pixels, student.unpatchify(tubelets * visible)]
    if student.target_dim is None:
        pred = out.pred.float()
        if student.norm_pix_loss:   # back from each channel of each tubelet standardised on its own
            masked = gather_patches(tubelets, out.ids_masked).unflatten(-1, (-1, 3))
            pred = (pred.unflatten(-1, (-1, 3)) * (masked.std(-2, keepdim=True) + 1e-6)
                    + masked.mean(-2, keepdim=True)).flatten(-2)
        recon = tubelets.clone().scatter_(1, out.ids_masked.unsqueeze(-1).expand(-1, -1, tubelets.shape[-1]), pred)
        rows.append(student.unpatchify(recon).clamp(0, 1))
    frames = range(0, clips.shape[2], every)
    rows = [row[0].permute(1, 0, 2, 3)[list(frames)] for row in rows]       # (frames, 3, H, W)
    if pred_loss is not None:
        g = student.grid_size
        layout = student.layout
        heat = normalise_per_image(pred_loss[:1]).view(layout.frames, g, g)
        heat = heat_colors(heat[[f // layout.tubelet_size for f in frames]]).permute(0, 3, 1, 2)
        rows.append(torch.nn.functional.interpolate(heat, size=clips.shape[-2:], mode="nearest"))
    return rows


@torch.no_grad()
def reconstruction_grid(student: MaskedAutoencoderHPM, imgs: torch.Tensor, mask: torch.Tensor,
                        pred_loss: torch.Tensor | None, stats: Stats = IMAGENET) -> torch.Tensor:
    """Rows: input, masked input, reconstruction, the teacher's predicted-loss map (colour scale); for
    clips the frames of the first clip (`clip_rows`)."""
    if student.video:
        rows = clip_rows(student, imgs, mask, pred_loss, stats)
        return make_grid(torch.cat(rows).float().cpu(), nrow=rows[0].shape[0], padding=1)
    rows = reconstruction_rows(student, imgs, mask, stats)
    if pred_loss is not None:
        g = student.grid_size
        heat = heat_colors(normalise_per_image(pred_loss).view(-1, g, g)).permute(0, 3, 1, 2)
        rows.append(torch.nn.functional.interpolate(heat, size=imgs.shape[-2:], mode="nearest"))
    return make_grid(torch.cat(rows).float().cpu(), nrow=imgs.shape[0], padding=1)
