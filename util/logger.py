"""Console logging for rank 0 and a metric logger that reads device values only when it prints."""
import datetime
import itertools
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
        """Yield the items, logging every `print_freq` steps; each line says which share of the time
        so far went into waiting for the next item (the data loader): a starved GPU shows in the
        first minute as a large `data wait`."""
        total = len(iterable)
        start = time.time()
        waited = 0.0
        items = iter(iterable)
        for i in itertools.count():
            asked = time.time()
            try:
                item = next(items)
            except StopIteration:
                break
            waited += time.time() - asked
            yield item
            if i % print_freq == 0 or i == total - 1:
                elapsed = time.time() - start
                eta = elapsed / (i + 1) * (total - i - 1)
                log.info(f"{header} [{i + 1}/{total}]  eta {datetime.timedelta(seconds=int(eta))}  "
                         f"{self.describe()}  {elapsed / (i + 1):.3f} s/it  data wait {waited / elapsed:.0%}")
        elapsed = time.time() - start
        log.info(f"{header} done in {datetime.timedelta(seconds=int(elapsed))} (data wait "
                 f"{waited / max(elapsed, 1e-9):.0%} of it)")


def append_json_log(path: Path, record: dict) -> None:
    """One JSON object per line (log.txt), appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
