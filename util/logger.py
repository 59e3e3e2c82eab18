"""Console logging for rank 0 and a metric logger that reads device values only when it prints."""
import datetime
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import torch

log = logging.getLogger("hpm")


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False


class MetricLogger:
    """Running averages of per-step values; tensors stay on the device until a print step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.last: dict[str, torch.Tensor | float] = {}

    def update(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self.sums[name] = self.sums[name] + value
            self.counts[name] += 1
            self.last[name] = value

    def averages(self, totals: tuple[str, ...] = ("skipped_steps",)) -> dict[str, float]:
        """Means of every value, except the `totals`, which are summed (counts such as skipped steps)."""
        return {k: float(self.sums[k]) / (1 if k in totals else self.counts[k]) for k in self.sums}

    def describe(self) -> str:
        return "  ".join(f"{k}: {float(self.last[k]):.4g} ({float(self.sums[k]) / self.counts[k]:.4g})"
                         for k in self.sums)

    def log_every(self, iterable: Iterable, print_freq: int, header: str) -> Iterator:
        total = len(iterable)
        start = time.time()
        for i, item in enumerate(iterable):
            yield item
            if i % print_freq == 0 or i == total - 1:
                elapsed = time.time() - start
                eta = elapsed / (i + 1) * (total - i - 1)
                log.info(f"{header} [{i + 1}/{total}]  eta {datetime.timedelta(seconds=int(eta))}  "
                         f"{self.describe()}  {elapsed / (i + 1):.3f} s/it")
        log.info(f"{header} done in {datetime.timedelta(seconds=int(time.time() - start))}")


def append_json_log(path: Path, record: dict) -> None:
    """One JSON object per line (log.txt), appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
