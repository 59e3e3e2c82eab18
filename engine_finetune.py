"""Fine-tuning / linear-probing epochs and the full-validation-set evaluation."""
import datetime
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from util.distributed import is_distributed, reduce_stats
from util.errors import UserError
from util.logger import MetricLogger
from util.checkpoint import save_training_checkpoint
from util.preemption import STOP, ResumePoint, rng_state
from util.runtime import append_json_log, autocast, optimizer_step, seed_epoch, set_scheduled_lr

log = logging.getLogger("hpm")


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, amp_dtype, epoch: int, args,
                    mixup_fn: Callable | None = None, model_ema=None, writer=None,
                    first_step: int = 0) -> tuple[dict[str, float], int]:
    """Train from `first_step` to the end of the epoch, or until a stop is requested.

    Returns the epoch's averaged metrics and the index of the next step to run.
    """
    model.train()
    metrics = MetricLogger()
    steps = first_step + len(loader)
    next_step = steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    header = f"Epoch [{epoch}/{args.epochs}]"
    for step, (imgs, targets) in enumerate(metrics.log_every(loader, args.print_freq, header), start=first_step):
        if step % args.accum_iter == 0:
            lr = set_scheduled_lr(optimizer, epoch + step / steps, args)
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
            grad_norm, skipped = optimizer_step(optimizer, scaler, trainable, args.clip_grad)
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            if scaler.is_enabled():
                values["skipped_steps"] = skipped
            if model_ema is not None:
                model_ema.update(model)
        metrics.update(**values, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            check_finite(float(metrics.last["loss"]), epoch, step, scaler)
            if writer is not None:
                for name, value in metrics.last.items():
                    writer.add_scalar(f"train/{name}", float(value), epoch * steps + step)
        if last_micro_step and STOP.requested(device, sync=(step + 1) // args.accum_iter % args.print_freq == 0):
            next_step = step + 1
            break
    stats = reduce_stats(metrics.averages(), device)
    check_finite(stats["loss"], epoch, next_step - 1, scaler)
    return stats, next_step


def check_finite(loss: float, epoch: int, step: int, scaler: torch.amp.GradScaler) -> None:
    if not math.isfinite(loss) and not scaler.is_enabled():
        raise UserError(f"non-finite training loss at epoch {epoch}, step {step}; the last good checkpoint is "
                        f"kept: lower --blr, set --clip_grad, or use --amp none")


def describe_eval(stats: dict[str, float]) -> str:
    return (f"accuracy of the network on the {stats['count']} validation images: top-1 {stats['acc1']:.2f}%, "
            f"top-5 {stats['acc5']:.2f}%, loss {stats['loss']:.4f}")


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


@dataclass
class ClassifierRun:
    """What `fit` needs besides the model: the loaders, optimisation objects and outputs."""
    train_model: nn.Module                 # what the loop calls (possibly DDP-wrapped)
    saved_model: nn.Module                 # what checkpoints hold and validation scores
    criterion: nn.Module
    loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    fmt: str                               # checkpoint format
    output_dir: Path
    is_main: bool
    rank: int = 0
    mixup_fn: Callable | None = None
    model_ema: object | None = None
    writer: object | None = None


def fit(run: ClassifierRun, args, start: ResumePoint, best_acc: float = 0.0) -> float:
    """Epochs from `start` to args.epochs: train, score the full validation set, save, log.

    A stop request saves a mid-epoch checkpoint and ends the process through STOP.finish().
    Returns the best top-1 accuracy.
    """
    STOP.install()
    steps_per_epoch = len(run.loader)
    ema_module = run.model_ema.module if run.model_ema is not None else None
    started = time.time()
    for epoch in range(start.epoch, args.epochs):
        seed_epoch(args.seed, run.rank, epoch)
        first_step = start.first_step(epoch, run.is_main)
        run.loader.sampler.set_epoch(epoch, skip=first_step * args.batch_size)
        train_stats, next_step = train_one_epoch(run.train_model, run.criterion, run.loader, run.optimizer,
                                                 run.scaler, run.device, run.amp_dtype, epoch, args, run.mixup_fn,
                                                 run.model_ema, run.writer, first_step)
        finished = next_step >= steps_per_epoch
        states = {"model": run.saved_model, "model_ema": ema_module, "optimizer": run.optimizer,
                  "scaler": run.scaler, "best_acc1": best_acc}
        if not finished:
            if run.is_main:
                save_training_checkpoint([run.output_dir / "checkpoint-last.pth"], run.fmt, args.model, epoch, args,
                                         {**states, "next_step": next_step, "rng": rng_state()})
            STOP.finish(epoch, next_step)
            return best_acc
        val_stats = evaluate(run.saved_model, run.val_loader, run.device, run.amp_dtype)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in val_stats.items()}}
        if ema_module is not None:
            ema_stats = evaluate(ema_module, run.val_loader, run.device, run.amp_dtype)
            record.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        is_best = val_stats["acc1"] > best_acc
        best_acc = max(best_acc, val_stats["acc1"])
        if run.is_main:
            paths = [run.output_dir / "checkpoint-last.pth"]
            if is_best:
                paths.append(run.output_dir / "checkpoint-best.pth")
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                paths.append(run.output_dir / f"checkpoint-{epoch}.pth")
            save_training_checkpoint(paths, run.fmt, args.model, epoch + 1, args, {**states, "best_acc1": best_acc})
            append_json_log(run.output_dir / "log.txt", {**record, "best_acc1": best_acc})
            for key in ("acc1", "acc5", "loss"):
                run.writer.add_scalar(f"test/{key}", val_stats[key], epoch)
            run.writer.flush()
        ema_note = f", EMA top-1 {record['test_ema_acc1']:.2f}%" if ema_module is not None else ""
        log.info(f"epoch {epoch}: top-1 {val_stats['acc1']:.2f}% top-5 {val_stats['acc5']:.2f}% on "
                 f"{val_stats['count']} images (best {best_acc:.2f}%){ema_note}")
    if run.writer is not None:
        run.writer.close()
    log.info(f"training time {datetime.timedelta(seconds=int(time.time() - started))}; best top-1 {best_acc:.2f}%")
    return best_acc
