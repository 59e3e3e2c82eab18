"""The training loop shared by pretraining, fine-tuning and linear probing.

Each engine supplies a `Task` (its step, what follows an optimizer step, what an epoch ends
with, what goes into a checkpoint); everything else is written once here: gradient
accumulation, the learning-rate schedule, DDP's `no_sync`, the scaled and clipped optimizer step,
the finite-loss check, logging, graceful stops with mid-epoch checkpoints, and resuming.
"""
import datetime
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.nn as nn

from util.checkpoint import ResumePoint, resume_training, save_training_checkpoint
from util.distributed import DistInfo, gather_objects, is_distributed, reduce_stats
from util.errors import UserError
from util.faults import fault_point
from util.logger import MetricLogger, append_json_log
from util.optim import optimizer_step, set_scheduled_lr
from util.preemption import STOP
from util.rng import rng_state, seed_epoch, set_rng_state

log = logging.getLogger("hpm")

Timer = Callable[[str], ContextManager]


def no_timer(phase: str) -> ContextManager:
    """The default phase timer: nothing (the benchmark passes one that measures)."""
    return nullcontext()


class NonFiniteLossError(UserError):
    """Training diverged; the last good checkpoint is left as it was."""


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


class CollectiveTimeoutError(UserError):
    """A collective operation did not complete within --dist_timeout: another rank is stuck or dead."""


class Task(Protocol):
    """What an engine supplies to the loop."""
    model: nn.Module                   # what the step calls (possibly DDP-wrapped or compiled)
    generators: tuple                  # the task's own RNGs, seeded per epoch and saved on a stop
    objective: str                     # the value of `forward` that is minimised
    finite_losses: dict[str, str]      # metric name -> how the error names it
    score_key: str | None              # epoch-record key whose maximum is kept as checkpoint-best

    def train(self) -> None: ...
    def forward(self, batch, epoch: int, timer: Timer) -> dict[str, torch.Tensor]: ...
    def after_optimizer_step(self, epoch: int, timer: Timer) -> None: ...
    def scalars(self, epoch: int) -> dict[str, float]: ...
    def states(self) -> dict[str, Any]: ...
    def end_epoch(self, epoch: int, writer) -> dict[str, Any]: ...
    def describe(self, record: dict) -> str: ...


@dataclass
class Run:
    """A task and everything the loop needs around it."""
    task: Task
    loader: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dist: DistInfo
    output_dir: Path
    fmt: str                        # checkpoint format
    args: Any
    writer: Any = None
    settings: dict | None = None    # what makes this run this run (util.args.run_settings), saved for auto-resume

    def __post_init__(self) -> None:
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.skips_in_a_row = torch.zeros((), device=self.device)   # fp16 steps the scaler skipped, consecutive

    def resume(self, path: Path | None) -> tuple[ResumePoint, float]:
        """Restore the task's states, the optimizer and the scaler from one of this script's checkpoints."""
        if path is None:
            return ResumePoint(self.args.start_epoch), 0.0
        ckpt = resume_training(path, self.fmt, self.args.model,
                               {**self.task.states(), "optimizer": self.optimizer, "scaler": self.scaler})
        start = ResumePoint.from_checkpoint(ckpt)
        log.info(f"resumed from {path} at {start}")
        return start, float(ckpt.get("best_score", ckpt.get("best_acc1", 0.0)))

    def save(self, paths: list[Path], next_epoch: int, best: float, next_step: int = 0, rng=None) -> None:
        stats = {"mean": self.args.mean, "std": self.args.std} if getattr(self.args, "mean", None) else None
        try:
            save_training_checkpoint(paths, self.fmt, self.args.model, next_epoch, self.args,
                                     {**self.task.states(), "optimizer": self.optimizer, "scaler": self.scaler,
                                      "best_score": best, "next_step": next_step, "rng": rng,
                                      "normalization": stats, "settings": self.settings})
        except OSError as exc:
            needed = max((p.stat().st_size for p in self.output_dir.glob("checkpoint-*.pth")), default=0)
            free = shutil.disk_usage(self.output_dir).free
            message = (f"saving a checkpoint in {self.output_dir} failed ({exc.strerror or exc}); it needs about "
                       f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; the previous checkpoint is "
                       f"intact")
            if not getattr(self.args, "save_retry", False):
                raise CheckpointSaveError(f"{message}: free space and rerun the same command to resume "
                                          f"(or pass --save_retry to keep training)") from None
            log.warning(f"{message}; training goes on (--save_retry) and the next save tries again")


def train_step(run: Run, batch, epoch: int, last_micro_step: bool, timer: Timer = no_timer) -> dict[str, torch.Tensor]:
    """One micro-step: the task's forward and the backward; at the last micro-step of an
    accumulation also the optimizer step and what follows it. Returns device tensors."""
    args = run.args
    no_sync = getattr(run.task.model, "no_sync", None)
    with (no_sync() if no_sync is not None and not last_micro_step else nullcontext()):
        values = run.task.forward(batch, epoch, timer)
        with timer("backward"):
            run.scaler.scale(values[run.task.objective] / args.accum_iter).backward()
    if last_micro_step:
        with timer("optimizer"):
            grad_norm, skipped = optimizer_step(run.optimizer, run.scaler, run.params, args.clip_grad)
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        if run.scaler.is_enabled():
            values["skipped_steps"] = skipped
            run.skips_in_a_row = (run.skips_in_a_row + 1) * skipped.to(run.skips_in_a_row.device)
        run.task.after_optimizer_step(epoch, timer)
    return values


def check_finite(run: Run, values: dict, epoch: int, step: int) -> None:
    """Stop on a non-finite loss; with fp16 the scaler skips such steps, but only a bounded
    number in a row (--max_skipped_steps), so a diverged run does not stall silently."""
    if run.scaler.is_enabled():
        skipped = int(run.skips_in_a_row)
        if skipped >= run.args.max_skipped_steps:
            raise NonFiniteLossError(f"fp16: the gradient scaler skipped {skipped} optimizer steps in a row "
                                     f"(non-finite gradients) up to epoch {epoch}, step {step}; the last good "
                                     f"checkpoint is kept: lower --blr, set --clip_grad, or use --amp bf16")
        return
    for name, what in run.task.finite_losses.items():
        if name in values and not math.isfinite(float(values[name])):
            raise NonFiniteLossError(f"non-finite {what} loss at epoch {epoch}, step {step}; the last good "
                                     f"checkpoint is kept: lower --blr, set --clip_grad, or use --amp none")


def train_one_epoch(run: Run, epoch: int, first_step: int = 0) -> tuple[dict[str, float], int]:
    """Train from `first_step` to the end of the epoch, or until a stop is requested.

    Returns the epoch's averaged metrics and the index of the next step to run.
    """
    args, task = run.args, run.task
    task.train()
    metrics = MetricLogger()
    steps = first_step + len(run.loader)
    run.optimizer.zero_grad(set_to_none=True)
    next_step = steps
    header = f"Epoch [{epoch}/{args.epochs}]"
    for step, batch in enumerate(metrics.log_every(run.loader, args.print_freq, header), start=first_step):
        if step % args.accum_iter == 0:
            lr = set_scheduled_lr(run.optimizer, epoch + step / steps, args)
        last_micro_step = (step + 1) % args.accum_iter == 0
        values = train_step(run, batch, epoch, last_micro_step)
        metrics.update(**values, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            check_finite(run, metrics.last, epoch, step)
            if run.writer is not None:
                scalars = {**{k: float(v) for k, v in metrics.last.items()}, **task.scalars(epoch)}
                for name, value in scalars.items():
                    run.writer.add_scalar(f"train/{name}", value, epoch * steps + step)
        fault_point("step")
        if last_micro_step and STOP.requested(run.device, sync=(step + 1) // args.accum_iter % args.print_freq == 0):
            next_step = step + 1
            break
    stats = reduce_stats(metrics.averages(), run.device)
    check_finite(run, stats, epoch, next_step - 1)
    return {**stats, **task.scalars(epoch)}, next_step


def fit(run: Run, start: ResumePoint, best: float = 0.0) -> dict:
    """Epochs from `start` to args.epochs: train, save, end the epoch (evaluate, pictures), log.

    A stop request saves a mid-epoch checkpoint (with every rank's RNG states) and ends the
    process through STOP.finish(). A collective that times out ends it with one line naming the
    rank. Returns the last epoch's record.
    """
    try:
        return _fit(run, start, best)
    except RuntimeError as exc:
        text = str(exc)
        if not is_distributed() or not any(word in text.lower() for word in ("timed out", "timeout")):
            raise
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:200]
        raise CollectiveTimeoutError(f"rank {run.dist.rank}: a collective operation did not complete within "
                                     f"--dist_timeout {run.args.dist_timeout:g} min ({first}): another rank is "
                                     f"stuck or dead; the last checkpoint is intact, rerun to resume") from None


def _fit(run: Run, start: ResumePoint, best: float) -> dict:
    args, task, dist = run.args, run.task, run.dist
    STOP.install()
    steps_per_epoch = len(run.loader)
    started = time.time()
    record: dict = {}
    for epoch in range(start.epoch, args.epochs):
        seed_epoch(args.seed, dist.rank, epoch, task.generators)
        first_step = start.first_step(epoch)
        saved_rng = start.rng_of(epoch, dist.rank)
        if saved_rng is not None:
            set_rng_state(saved_rng, task.generators)
        run.loader.sampler.set_epoch(epoch, skip=first_step * args.batch_size)
        stats, next_step = train_one_epoch(run, epoch, first_step)
        if next_step < steps_per_epoch:
            rng = gather_objects(rng_state(task.generators))
            if dist.is_main:
                run.save([run.output_dir / "checkpoint-last.pth"], epoch, best, next_step, rng)
            STOP.finish(epoch, next_step)
            return record
        # The epoch's training is saved before anything that ends it (evaluation, pictures), so that a
        # failure there cannot cost trained work: a rerun resumes after this epoch.
        last = run.output_dir / "checkpoint-last.pth"
        paths = [last]
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            paths.append(run.output_dir / f"checkpoint-{epoch}.pth")
        if dist.is_main:
            run.save(paths, epoch + 1, best)
        fault_point("end_epoch")
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}, **task.end_epoch(epoch, run.writer)}
        if task.score_key is not None:
            improved = record[task.score_key] > best
            best = max(best, record[task.score_key])
            record[f"best_{task.score_key.removeprefix('test_')}"] = best
            if improved and dist.is_main:   # the new best score goes into checkpoint-last too
                run.save([last, run.output_dir / "checkpoint-best.pth"], epoch + 1, best)
        if dist.is_main:
            append_json_log(run.output_dir / "log.txt", record)
        eta = (time.time() - started) / (epoch + 1 - start.epoch) * (args.epochs - epoch - 1)
        log.info(f"{task.describe(record)}; run ETA {datetime.timedelta(seconds=int(eta))}")
    if run.writer is not None:
        run.writer.close()
    log.info(f"training time {datetime.timedelta(seconds=int(time.time() - started))}")
    return record
