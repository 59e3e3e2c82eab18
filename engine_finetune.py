"""Fine-tuning / linear-probing epochs and the full-validation-set evaluation."""
import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn

from util.distributed import is_distributed
from util.errors import UserError
from util.logger import MetricLogger
from util.runtime import autocast
from util.schedules import cosine_lr


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, amp_dtype, epoch: int, args,
                    mixup_fn: Callable | None = None, model_ema=None, writer=None) -> dict[str, float]:
    model.train()
    metrics = MetricLogger()
    steps = len(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    for step, (imgs, targets) in enumerate(metrics.log_every(loader, args.print_freq, f"Epoch [{epoch}/{args.epochs}]")):
        if step % args.accum_iter == 0:
            lr = cosine_lr(epoch + step / steps, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            imgs, targets = mixup_fn(imgs, targets)
        last_micro_step = (step + 1) % args.accum_iter == 0
        no_sync = getattr(model, "no_sync", None)
        with (no_sync() if no_sync is not None and not last_micro_step else nullcontext()):
            with autocast(device, amp_dtype):
                loss = criterion(model(imgs), targets)
            scaler.scale(loss / args.accum_iter).backward()
        values = {"loss": loss}
        if last_micro_step:
            scaler.unscale_(optimizer)
            if args.clip_grad:
                values["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
        metrics.update(**values, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            check_finite(float(metrics.last["loss"]), epoch, step, scaler)
            if writer is not None:
                for name, value in metrics.last.items():
                    writer.add_scalar(f"train/{name}", float(value), epoch * steps + step)
    stats = metrics.averages()
    check_finite(stats["loss"], epoch, steps - 1, scaler)
    return stats


def check_finite(loss: float, epoch: int, step: int, scaler: torch.amp.GradScaler) -> None:
    if not math.isfinite(loss) and not scaler.is_enabled():
        raise UserError(f"non-finite training loss at epoch {epoch}, step {step}; the last good checkpoint is "
                        f"kept: lower --blr, set --clip_grad, or use --amp none")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None) -> dict[str, float]:
    """Top-1, top-5 and loss over every sample of the (sharded, unpadded) validation set."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, top1, top5, count
    for imgs, targets in loader:
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == targets.unsqueeze(1)
        totals += torch.stack([nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    if is_distributed():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "count": int(count)}
