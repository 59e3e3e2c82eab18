"""One pretraining epoch (HPM or MAE) and the reconstruction picture for tensorboard."""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
from torchvision.utils import make_grid
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models_hpm import MaskedAutoencoderHPM
from util.errors import UserError
from util.distributed import reduce_stats
from util.logger import MetricLogger
from util.masking import hard_patch_mask
from util.patches import gather_patches
from util.preemption import STOP
from util.runtime import autocast, optimizer_step, set_scheduled_lr
from util.schedules import hard_patch_alpha, teacher_decay

MaskFn = Callable[[int, torch.device, torch.Generator], torch.Tensor]
Timer = Callable[[str], ContextManager]


def no_timer(phase: str) -> ContextManager:
    """The default phase timer: nothing (the benchmark passes one that measures)."""
    return nullcontext()


class NonFiniteLossError(UserError):
    """Training diverged; the last good checkpoint is left as it was."""


@dataclass
class PretrainSetup:
    model: nn.Module                       # the student, possibly DDP-wrapped or compiled
    student: MaskedAutoencoderHPM          # the unwrapped student (for losses and EMA)
    teacher: MaskedAutoencoderHPM | None   # EMA copy; None for MAE
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    random_mask: MaskFn                    # the mask of MAE mode
    mask_generator: torch.Generator
    device: torch.device
    amp_dtype: torch.dtype | None

    def __post_init__(self) -> None:
        self.student_params = list(self.student.parameters())
        self.trainable = [p for p in self.student_params if p.requires_grad]
        self.teacher_params = list(self.teacher.parameters()) if self.teacher is not None else []


@torch.no_grad()
def update_teacher(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], decay: float) -> None:
    """t = d * t + (1 - d) * s for every tensor, in one fused call."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)


def make_mask(setup: PretrainSetup, imgs: torch.Tensor, alpha: float, timer: Timer = no_timer) -> torch.Tensor:
    """HPM: the teacher's predicted losses choose the hard patches; MAE, and HPM while
    int(M * alpha) is still 0 (uniform masks either way), skip the teacher."""
    if setup.teacher is None or int(setup.student.num_masked * alpha) <= 0:
        with timer("masking"):
            return setup.random_mask(imgs.shape[0], imgs.device, setup.mask_generator)
    with timer("teacher"), autocast(setup.device, setup.amp_dtype):
        pred_loss = setup.teacher.predict_losses(imgs)
    with timer("masking"):
        return hard_patch_mask(pred_loss, setup.student.num_masked, alpha, generator=setup.mask_generator)


def train_step(setup: PretrainSetup, imgs: torch.Tensor, alpha: float, decay: float, args, last_micro_step: bool,
               timer: Timer = no_timer) -> dict[str, torch.Tensor]:
    """One micro-step: mask, student forward and backward; at the last micro-step of an
    accumulation also the optimizer step and the teacher's EMA update. Returns device tensors."""
    s = setup
    mask = make_mask(s, imgs, alpha, timer)
    no_sync = getattr(s.model, "no_sync", None)
    with (no_sync() if no_sync is not None and not last_micro_step else nullcontext()):
        with timer("forward"), autocast(s.device, s.amp_dtype):
            out = s.model(imgs, mask)
            losses = s.student.forward_loss(imgs, out)
        with timer("backward"):
            s.scaler.scale(losses.total / args.accum_iter).backward()
    values = {"loss": losses.total, "recon": losses.recon}
    if losses.loss_pred is not None:
        values["loss_pred"] = losses.loss_pred
    if last_micro_step:
        with timer("optimizer"):
            grad_norm, skipped = optimizer_step(s.optimizer, s.scaler, s.trainable, args.clip_grad)
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        if s.scaler.is_enabled():
            values["skipped_steps"] = skipped
        if s.teacher is not None:
            with timer("ema"):
                update_teacher(s.teacher_params, s.student_params, decay)
    return values


def train_one_epoch(setup: PretrainSetup, loader, epoch: int, args, writer=None,
                    first_step: int = 0) -> tuple[dict[str, float], int]:
    """Train from `first_step` to the end of the epoch, or until a stop is requested.

    Returns the epoch's averaged metrics and the index of the next step to run.
    """
    s = setup
    s.model.train()
    metrics = MetricLogger()
    steps = first_step + len(loader)
    alpha = hard_patch_alpha(epoch, args.epochs)
    decay = teacher_decay(epoch)
    s.optimizer.zero_grad(set_to_none=True)

    next_step = steps
    for step, (imgs, _) in enumerate(metrics.log_every(loader, args.print_freq, f"Epoch [{epoch}/{args.epochs}]"),
                                     start=first_step):
        if step % args.accum_iter == 0:
            lr = set_scheduled_lr(s.optimizer, epoch + step / steps, args)
        imgs = imgs.to(s.device, non_blocking=True)
        last_micro_step = (step + 1) % args.accum_iter == 0
        values = train_step(s, imgs, alpha, decay, args, last_micro_step)
        metrics.update(**values, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            check_finite(metrics.last, epoch, step, s.scaler)
            if writer is not None:
                global_step = epoch * steps + step
                for name, value in metrics.last.items():
                    writer.add_scalar(f"train/{name}", float(value), global_step)
                if s.teacher is not None:
                    writer.add_scalar("train/alpha", alpha, global_step)
                    writer.add_scalar("train/teacher_decay", decay, global_step)
        if last_micro_step and STOP.requested(s.device, sync=(step + 1) // args.accum_iter % args.print_freq == 0):
            next_step = step + 1
            break
    stats = reduce_stats(metrics.averages(), s.device)
    check_finite(stats, epoch, next_step - 1, s.scaler)
    if s.teacher is not None:
        stats.update(alpha=alpha, teacher_decay=decay)
    return stats, next_step


def check_finite(values: dict, epoch: int, step: int, scaler: torch.amp.GradScaler) -> None:
    """Stop on a non-finite loss; with fp16 the scaler already skips such steps."""
    for name in ("recon", "loss_pred"):
        if name in values and not math.isfinite(float(values[name])):
            if scaler.is_enabled():
                continue
            which = "reconstruction" if name == "recon" else "loss-prediction"
            raise NonFiniteLossError(f"non-finite {which} loss at epoch {epoch}, step {step}; the last good "
                                     f"checkpoint is kept: lower --blr or --clip_grad, or use --amp none")


@torch.no_grad()
def reconstruction_grid(student: MaskedAutoencoderHPM, imgs: torch.Tensor, mask: torch.Tensor,
                        pred_loss: torch.Tensor | None) -> torch.Tensor:
    """Rows: input, masked input, reconstruction (visible patches pasted back), teacher's loss map."""
    was_training = student.training
    student.eval()
    out = student(imgs, mask)
    target = student.patchify(imgs)
    pred = out.pred.float()
    if student.norm_pix_loss:
        masked_target = gather_patches(target, out.ids_masked)
        mean = masked_target.mean(-1, keepdim=True)
        std = (masked_target.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    recon = target.clone().scatter_(1, out.ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]), pred)
    rows = [imgs, student.unpatchify(target * (~mask).unsqueeze(-1)), student.unpatchify(recon)]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=imgs.device).view(1, 3, 1, 1)
    rows = [(r * std + mean).clamp(0, 1) for r in rows]
    if pred_loss is not None:
        g = student.grid_size
        lo = pred_loss.amin(1, keepdim=True)
        hi = pred_loss.amax(1, keepdim=True)
        heat = ((pred_loss - lo) / (hi - lo + 1e-12)).view(-1, 1, g, g)
        heat = torch.nn.functional.interpolate(heat.float(), size=imgs.shape[-2:], mode="nearest")
        rows.append(heat.expand(-1, 3, -1, -1))
    student.train(was_training)
    return make_grid(torch.cat(rows).float().cpu(), nrow=imgs.shape[0], padding=1)
