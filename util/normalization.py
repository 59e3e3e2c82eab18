"""The per-channel mean and std that every transform normalises with: ImageNet's by default, the
training set's own with `--norm dataset`, or explicit `--mean/--std`. Pretraining stores them in
its checkpoints, and fine-tuning, probing, kNN and the export read them from there."""
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Subset

from util.errors import UserError

log = logging.getLogger("hpm")


@dataclass(frozen=True)
class Stats:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __str__(self) -> str:
        return (f"mean ({', '.join(f'{m:.4f}' for m in self.mean)}), "
                f"std ({', '.join(f'{s:.4f}' for s in self.std)})")

    def close_to(self, other: "Stats", tol: float = 1e-4) -> bool:
        return all(abs(a - b) <= tol for a, b in zip(self.mean + self.std, other.mean + other.std))

    def tensors(self, device: torch.device, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as float32 tensors of shape (1, C, 1, ...) with `dims` dimensions on `device`,
        made once per device: a step that un-normalises does no host-to-device copy."""
        return _stat_tensors(tuple(self.mean), tuple(self.std), torch.device(device), dims)


IMAGENET = Stats(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))


@functools.lru_cache(maxsize=16)
def _stat_tensors(mean: tuple, std: tuple, device: torch.device, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean)) + (1,) * (dims - 2)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


def explicit_stats(mean: list[float] | None, std: list[float] | None) -> Stats | None:
    """--mean/--std as Stats (None when neither is given); a one-line error for bad values."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UserError("--mean and --std go together: give three values to each (e.g. --mean 0.5 0.5 0.5 "
                        "--std 0.25 0.25 0.25)")
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) != 3:
            raise UserError(f"{flag} takes one value per RGB channel, 3 in all (got {len(values)})")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{flag} {' '.join(map(str, values))}: values must be finite")
    if min(std) <= 0:
        raise UserError(f"--std {' '.join(map(str, std))}: every std must be above 0")
    return Stats(tuple(float(m) for m in mean), tuple(float(s) for s in std))


class _ChannelSums(Dataset):
    """Per image: the per-channel sum and sum of squares of its pixels (in [0, 1]) and its pixel count."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.dataset[index][0].double().flatten(1)                  # (3, H * W)
        return torch.cat([img.sum(1), img.pow(2).sum(1), torch.tensor([float(img.shape[1])], dtype=torch.double)])


def dataset_stats(dataset: Dataset, max_images: int = 5000, seed: int = 0, num_workers: int = 0) -> Stats:
    """Per-channel mean and (population) std of the images of `dataset`, which must yield (3, H, W)
    tensors in [0, 1] (after the RGB conversion, before any normalisation): exact over all images
    up to `max_images`, else over a fixed sample of that many drawn with `seed`."""
    n = len(dataset)
    if n > max_images:
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].tolist()
        dataset = Subset(dataset, ids)
        log.info(f"dataset statistics: a seeded sample of {max_images} of the {n} training images")
    loader = DataLoader(_ChannelSums(dataset), batch_size=64, num_workers=num_workers)
    totals = torch.zeros(7, dtype=torch.double)
    done, report_every = 0, max(1, len(loader) // 10)
    for i, sums in enumerate(loader):
        totals += sums.sum(0)
        done += sums.shape[0]
        if (i + 1) % report_every == 0 or i + 1 == len(loader):
            log.info(f"dataset statistics: {done}/{len(dataset)} images")
    count = totals[6]
    mean = totals[:3] / count
    std = (totals[3:6] / count - mean.pow(2)).clamp_min(0).sqrt()
    if float(std.min()) <= 0:
        raise UserError("--norm dataset: a colour channel is constant over the training images (std 0); "
                        "use --norm imagenet or give --mean/--std")
    return Stats(tuple(mean.tolist()), tuple(std.tolist()))


def stats_in_checkpoint(ckpt: dict) -> Stats | None:
    """The statistics a checkpoint was trained with (ours: `normalization`); None for files that
    carry none (the reference's, MAE's, timm's, older ones), which were trained with ImageNet's."""
    saved = ckpt.get("normalization")
    if not isinstance(saved, dict) and isinstance(ckpt.get("args"), dict):
        args = ckpt["args"]
        saved = {"mean": args.get("mean"), "std": args.get("std")} if args.get("mean") else None
    if not isinstance(saved, dict) or saved.get("mean") is None:
        return None
    return Stats(tuple(float(v) for v in saved["mean"]), tuple(float(v) for v in saved["std"]))


def downstream_stats(weights: str | None, mean: list[float] | None, std: list[float] | None,
                     what: str = "--finetune") -> Stats:
    """Fine-tuning, probing, kNN, export: explicit --mean/--std, else the checkpoint's, else
    ImageNet's; a log line says which, and explicit values that differ from the checkpoint's warn."""
    from util.checkpoint import load_file
    explicit = explicit_stats(mean, std)
    saved = stats_in_checkpoint(load_file(weights, what, mmap=True)) if weights else None
    if explicit is not None:
        if saved is not None and not explicit.close_to(saved):
            log.warning(f"--mean/--std ({explicit}) differ from the statistics {Path(weights).name} was "
                        f"trained with ({saved}); using --mean/--std")
        log.info(f"normalisation: {explicit} (--mean/--std)")
        return explicit
    if saved is not None:
        log.info(f"normalisation: {saved} (from {weights})")
        return saved
    log.info(f"normalisation: ImageNet's, {IMAGENET}" + (f" ({weights} carries none)" if weights else ""))
    return IMAGENET
