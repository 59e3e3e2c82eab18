"""Fault injection at named points, for tests that must kill or stop a process at an exact moment
instead of after a sleep.

`HPM_FAULT="point=NAME,at=N,action=ACTION[,rank=R]"` makes the process act the N-th time (default 1)
it reaches point NAME (on rank R only, if given). Actions: a signal name (SIGKILL, SIGTERM, SIGUSR1,
SIGUSR2, ...) sent to the process itself, `oserror` (raise ENOSPC), `error` (raise a RuntimeError)
or `hang` (sleep for an hour). With `to=parent` the signal goes to the parent process (e.g. the
submitit job of an ablation run) and the process then waits for the parent's SIGTERM and handles it
right there, so that the stop it asks for lands at this point. With `once=PATH` the fault fires only
if PATH does not exist yet, and creates it (so a resumed or requeued process with the same
environment runs on). Points: `step` (after each training micro-step), `save` (a checkpoint's
temporary file is written, before it is renamed), `write` (just before a checkpoint's bytes are
written), `end_epoch` (an epoch's training is saved; its evaluation and pictures come next),
`picture` (pretraining's tensorboard picture is drawn).
Without the variable every point is a no-op.
"""
import errno
import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()


def _spec() -> dict[str, str] | None:
    text = os.environ.get("HPM_FAULT")
    if not text:
        return None
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def fault_point(name: str) -> None:
    spec = _spec()
    if spec is None or spec.get("point") != name:
        return
    if "rank" in spec and os.environ.get("RANK", "0") != spec["rank"]:
        return
    _reached[name] += 1
    if _reached[name] != int(spec.get("at", 1)):
        return
    if "once" in spec:
        try:   # created atomically: of processes reaching the point together, one fires
            os.close(os.open(spec["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    action = spec.get("action", "SIGKILL")
    if action == "oserror":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "error":
        raise RuntimeError(f"fault injected at {name}")
    if action == "hang":
        time.sleep(3600)
        return
    if spec.get("to") != "parent":
        os.kill(os.getpid(), getattr(signal, action))
        return
    # Wait here until the process's own SIGTERM handler has run (in the main thread, whichever
    # thread the kernel gave the signal to), chaining to it.
    previous = signal.getsignal(signal.SIGTERM)
    answered: list[int] = []

    def note(signum: int, frame) -> None:
        answered.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        os.kill(os.getppid(), getattr(signal, action))
        deadline = time.monotonic() + 600
        while not answered and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)
