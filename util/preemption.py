"""Graceful stops: a signal asks the training loop to finish its step, save and exit.

Plain runs listen to SIGTERM and SIGUSR1 and exit with EXIT_PREEMPTED after saving; under
submitit, its timeout/preemption signal is caught the same way and, once the checkpoint is
written, handed back to submitit, which requeues the job.
"""
import logging
import random
import signal
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from util.distributed import is_distributed

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: rerun the same command to resume

log = logging.getLogger("hpm")


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.installed = False
        self._after_save: Callable[[], None] = lambda: sys.exit(EXIT_PREEMPTED)

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1),
                after_save: Callable[[], None] | None = None) -> None:
        """Listen to `signals`; the first call wins (a launcher installs before the script does)."""
        if self.installed:
            return
        for sig in signals:
            signal.signal(sig, self._handle)
        if after_save is not None:
            self._after_save = after_save
        self.installed = True

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, device: torch.device, sync: bool) -> bool:
        """Whether to stop now; with several processes the ranks agree (only at `sync` steps)."""
        if not is_distributed():
            return self.signal_name is not None
        if not sync:
            return False
        flag = torch.tensor([float(self.signal_name is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def finish(self, epoch: int, step: int) -> None:
        """Called once the checkpoint of `epoch`, stopped before `step`, is on disk."""
        log.warning(f"{self.signal_name}: saved epoch {epoch} at step {step} to checkpoint-last.pth; "
                    f"rerun the same command to resume")
        self._after_save()


STOP = StopRequest()


def rng_state(mask_generator: torch.Generator | None = None) -> dict:
    """Every RNG state of this process, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mask_generator is not None:
        state["mask_generator"] = mask_generator.get_state()
    return state


def set_rng_state(state: dict, mask_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if mask_generator is not None and "mask_generator" in state:
        mask_generator.set_state(state["mask_generator"])


@dataclass
class ResumePoint:
    """Where a run continues: the epoch, the step inside it, and the RNG states saved at that step."""
    epoch: int = 0
    step: int = 0
    rng: dict | None = None

    def __str__(self) -> str:
        return f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "ResumePoint":
        return cls(int(ckpt["next_epoch"]), int(ckpt.get("next_step", 0)), ckpt.get("rng"))

    def first_step(self, epoch: int, is_main: bool, mask_generator: torch.Generator | None = None) -> int:
        """The step to start `epoch` at; restores the saved RNG states when resuming inside it."""
        if epoch != self.epoch or not self.step:
            return 0
        if is_main and self.rng is not None:
            set_rng_state(self.rng, mask_generator)
        return self.step
