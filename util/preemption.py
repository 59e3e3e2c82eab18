"""Graceful stops: a signal asks the training loop to finish its step, save and exit.

Plain runs listen to SIGTERM and SIGUSR1 and exit with EXIT_PREEMPTED after saving; under
submitit, its timeout/preemption signal is caught the same way and, once the checkpoint is
written, handed back to submitit, which requeues the job.
"""
import logging
import signal
import sys
from typing import Callable

import torch

from util.distributed import cleanup, is_distributed

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
        cleanup()   # leave the process group before exiting (NCCL warns of, and may hang on, one left open)
        self._after_save()


STOP = StopRequest()
