"""How much a competing process slows the quick start, and which thread setting recovers it.

Runs `main_pretrain.py` (the built-in default, a few epochs) under each thread setting, once on a
quiet machine and once with a busy process pinned to one core, and prints seconds per epoch:

    python benchmarks/bench_contention.py --epochs 4 --json contention.json

Settings: torch's default (one thread per core, OpenMP threads spin while they wait), OpenMP's
passive wait policy (`OMP_WAIT_POLICY=PASSIVE`: waiting threads sleep), and one thread.
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}


def busy_loop(core: int) -> None:
    """A competing process: pure Python arithmetic on one core, forever."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def seconds_per_epoch(env: dict, epochs: int) -> list[float]:
    """Each epoch's duration as main_pretrain logs it ('Epoch [e/n] done in H:MM:SS' is too coarse:
    the per-step time of its progress lines is averaged instead)."""
    with tempfile.TemporaryDirectory() as out:
        res = subprocess.run([sys.executable, str(REPO / "main_pretrain.py"), "--epochs", str(epochs),
                              "--output_dir", out, "--num_workers", "0", "--print_freq", "22"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    steps = [float(m) for m in re.findall(r"\[22/22\].* ([0-9.]+) s/it", res.stdout)]
    return [s * 22 for s in steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--busy_core", type=int, default=0, help="the core the competing process runs on")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    rows = []
    print(f"{'setting':<12} {'quiet s/epoch':>14} {'busy s/epoch':>13} {'slowdown':>9}", flush=True)
    for name, extra in SETTINGS.items():
        env = {**base, **extra}
        quiet = seconds_per_epoch(env, args.epochs)
        rival = multiprocessing.Process(target=busy_loop, args=(args.busy_core,), daemon=True)
        rival.start()
        try:
            busy = seconds_per_epoch(env, args.epochs)
        finally:
            rival.terminate()
            rival.join()
        # the first epoch also pays for the start (imports, the digits' resizing): leave it out
        q, b = sum(quiet[1:]) / len(quiet[1:]), sum(busy[1:]) / len(busy[1:])
        rows.append({"setting": name, "env": extra, "quiet_s_per_epoch": q, "busy_s_per_epoch": b,
                     "slowdown": b / q, "quiet_epochs": quiet, "busy_epochs": busy})
        print(f"{name:<12} {q:>14.2f} {b:>13.2f} {b / q:>8.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
