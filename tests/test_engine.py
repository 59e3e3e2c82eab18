"""The shared training loop on a toy task: accumulation, the fp16 skip limit, the finite check."""
import argparse
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from engine import NonFiniteLossError, Run, train_one_epoch
from util.distributed import DistInfo


class ToyTask:
    """A linear model whose loss can be made non-finite from a given micro-step on."""
    objective = "loss"
    finite_losses = {"loss": "training"}
    score_key = None
    generators = ()

    def __init__(self, bad_from: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.bad_from, self.steps, self.updates = bad_from, 0, 0

    def train(self) -> None:
        self.model.train()

    def forward(self, batch, epoch, timer):
        loss = self.model(batch[0]).pow(2).mean()
        if self.bad_from is not None and self.steps >= self.bad_from:
            loss = loss * float("inf")
        self.steps += 1
        return {"loss": loss}

    def after_optimizer_step(self, epoch, timer) -> None:
        self.updates += 1

    def scalars(self, epoch):
        return {}


def _run(task, steps: int, fp16: bool, **flags) -> Run:
    args = argparse.Namespace(epochs=1, accum_iter=1, print_freq=5, lr=0.1, min_lr=0.0, warmup_epochs=0,
                              clip_grad=None, max_skipped_steps=10, **flags)
    loader = DataLoader(TensorDataset(torch.randn(steps * 2, 4), torch.zeros(steps * 2)), batch_size=2)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0 ** 8)
    return Run(task, loader, optimizer, scaler, torch.device("cpu"), DistInfo(), Path("."), "", args)


def test_fp16_run_stops_after_the_bounded_number_of_skipped_steps():
    run = _run(ToyTask(bad_from=3), steps=40, fp16=True)
    with pytest.raises(NonFiniteLossError, match="skipped 1[0-4] optimizer steps in a row") as exc:
        train_one_epoch(run, 0)
    assert "\n" not in str(exc.value) and "checkpoint is kept" in str(exc.value)
    assert run.task.steps <= 3 + 15                    # found at the first print step past the limit


def test_fp16_skips_that_recover_do_not_stop_the_run():
    task = ToyTask(bad_from=3)
    task.forward_bad = task.forward

    def forward(batch, epoch, timer):                   # non-finite for 5 steps only
        values = task.forward_bad(batch, epoch, timer)
        return values if task.steps <= 8 else {"loss": task.model(batch[0]).pow(2).mean()}
    task.forward = forward
    stats, next_step = train_one_epoch(_run(task, steps=40, fp16=True), 0)
    assert next_step == 40 and stats["skipped_steps"] == 5


def test_non_finite_loss_without_fp16_stops_at_once():
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at epoch 0, step 5"):
        train_one_epoch(_run(ToyTask(bad_from=3), steps=40, fp16=False), 0)


def test_accumulation_steps_the_optimizer_every_accum_iter_micro_steps():
    task = ToyTask()
    run = _run(task, steps=12, fp16=False)
    run.args.accum_iter = 4
    train_one_epoch(run, 0)
    assert task.steps == 12 and task.updates == 3
