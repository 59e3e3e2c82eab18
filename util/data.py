"""Datasets (built-in digits, ImageFolder, UM-MAE list files), robust image loading, loaders.

Augmentation randomness is seeded per sample from (seed, epoch, index), so a run resumed at an
epoch boundary sees exactly the crops and flips of an uninterrupted one, whatever the workers.
"""
import copy
import itertools
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from util.distributed import DistInfo
from util.errors import UserError
from util.normalization import IMAGENET, Stats
from util.rng import sample_seed, seed_all

log = logging.getLogger("hpm")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(UserError):
    """An image file that cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: greyscale, palette, CMYK, RGBA and 16-bit files included."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{path}: unreadable image ({exc}); remove or replace the file, or pass "
                            f"--bad_images skip") from None


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits as RGB images (default 32 x 32), split 80/20
    by a fixed permutation, so every script sees the same train and validation images."""

    num_classes = 10

    def __init__(self, split: str, transform: Callable | None = None, size: int = 32) -> None:
        from sklearn.datasets import load_digits
        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        num_val = len(order) // 5
        ids = order[num_val:] if split == "train" else order[:num_val]
        pixels = (digits.images[ids] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [Image.fromarray(p).resize((size, size), Image.BICUBIC).convert("RGB") for p in pixels]
        self.targets = [int(t) for t in digits.target[ids]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.targets[index]


class ImageListDataset(Dataset):
    """UM-MAE's list format: one 'relative/path label' per line, paths relative to `root`."""

    def __init__(self, root: Path, list_file: Path, transform: Callable | None = None) -> None:
        self.samples: list[tuple[str, int]] = []
        missing = []
        for num, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{list_file}:{num}: expected 'relative/path label', found {line.strip()!r}")
            path = root / parts[0]
            if not path.is_file():
                missing.append(f"{parts[0]} (line {num})")
            self.samples.append((str(path), int(parts[1])))
        if missing:
            raise UserError(f"{list_file}: {len(missing)} listed file(s) missing under {root}, first "
                            f"{missing[0]}; fix the list or the data path")
        self.targets = [label for _, label in self.samples]
        self.num_classes = max(self.targets, default=-1) + 1
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class SkipBadImages(Dataset):
    """Replaces an unreadable image by the next readable one, with a warning that names the file and
    counts the images skipped so far by this process (a data-loader worker is a process)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except BadImageError as exc:
                self.skipped += 1
                log.warning(f"skipped: {exc.args[0].split('; ')[0]} ({self.skipped} skipped in this process)")
        raise UserError("no readable image in the dataset: check --data_path")


def build_dataset(data_path: str | None, split: str, transform: Callable | None, bad_images: str = "stop") -> Dataset:
    """Built-in digits when `data_path` is None; else DIR/<split>.txt (list) or DIR/<split>/ (ImageFolder).

    `bad_images`: "stop" raises on an unreadable file, "skip" replaces it (see SkipBadImages).
    """
    if data_path is None:
        return DigitsDataset(split, transform)
    root = Path(data_path)
    hint = f"expected {root}/{split}/<class>/<images> or a list file {root}/{split}.txt"
    if not root.is_dir():
        raise UserError(f"--data_path {root}: no such directory; {hint}")
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        base = root / split if (root / split).is_dir() else root
        dataset = ImageListDataset(base, list_file, transform)
    elif (root / split).is_dir():
        try:
            dataset = datasets.ImageFolder(str(root / split), transform=transform, loader=load_rgb,
                                           is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))
        except FileNotFoundError as exc:
            raise UserError(f"--data_path {root}: {exc}; {hint}") from None
        dataset.num_classes = len(dataset.classes)
    else:
        raise UserError(f"--data_path {root}: found neither {split}/ nor {split}.txt; {hint}")
    if len(dataset) == 0:
        raise UserError(f"--data_path {root}: the {split} split is empty; {hint}")
    return SkipBadImages(dataset) if bad_images == "skip" else dataset


def with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    """The same images (no second directory scan) under another transform."""
    if isinstance(dataset, SkipBadImages):
        return SkipBadImages(with_transform(dataset.dataset, transform))
    view = copy.copy(dataset)
    view.transform = transform
    return view


def pretrain_transform(input_size: int, stats: Stats = IMAGENET) -> Callable:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(stats.mean, stats.std)])


def eval_transform(input_size: int, stats: Stats = IMAGENET, crop_pct: float | None = None) -> Callable:
    """Resize the short side to input_size / crop_pct (bicubic), centre-crop input_size. The
    default crop ratio is the reference's: 224 / 256 up to 224 px, 1.0 above."""
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(stats.mean, stats.std)])


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields (epoch, index), so each sample can seed its augmentation,
    and can skip the samples an interrupted epoch already consumed."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return self.num_samples - self.skip


class SeededDataset(Dataset):
    """Seeds torch, numpy and python RNGs from (seed, epoch, index) before each sample."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed_all(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def train_loader(dataset: Dataset, dist_info: DistInfo, batch_size: int, num_workers: int,
                 pin_memory: bool, seed: int, collate_fn: Callable | None = None) -> DataLoader:
    """Shuffled (per seed and epoch), drop-last, reproducible loader; call sampler.set_epoch each epoch."""
    if batch_size * dist_info.world_size > len(dataset):
        raise UserError(f"--batch_size {batch_size} x {dist_info.world_size} process(es) is larger than the "
                        f"{len(dataset)} training images: lower --batch_size")
    sampler = EpochSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                           seed=seed, drop_last=True)
    # its own generator: creating the iterator must not consume the global RNG (drop path uses it)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that accepts 0 bits on every Pillow: the black image older Pillows returned
    (Pillow 13 rejects 0, which timm's `rand-m9-mstd0.5-inc1` RandAugment can ask for)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def finetune_transform(input_size: int, args, stats: Stats = IMAGENET) -> Callable:
    """DeiT/MAE training augmentation: RandomResizedCrop (--crop_scale), flip (--hflip), RandAugment,
    random erasing."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    transform = create_transform(input_size=input_size, is_training=True, scale=tuple(args.crop_scale),
                                 hflip=args.hflip, color_jitter=args.color_jitter,
                                 auto_augment=args.aa or None, interpolation="bicubic", re_prob=args.reprob,
                                 re_mode=args.remode, re_count=args.recount, mean=stats.mean, std=stats.std)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_any_bits
    return transform


class ShardSampler(torch.utils.data.Sampler):
    """In-order, unpadded shard of the dataset for this rank: every sample is scored exactly once."""

    def __init__(self, length: int, dist_info: DistInfo) -> None:
        self.indices = list(range(dist_info.rank, length, dist_info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, dist_info: DistInfo, batch_size: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    """Dataset order, no shuffling, nothing dropped or repeated."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist_info),
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False)


class SingleDrawResizedCrop(transforms.RandomResizedCrop):
    """MAE's RandomResizedCrop for linear probing: one draw of area and log-ratio, the box clamped
    to the image, instead of torchvision's up-to-ten tries with a centre-crop fallback."""

    @staticmethod
    def get_params(img, scale, ratio) -> tuple[int, int, int, int]:
        width, height = transforms.functional.get_image_size(img)
        area = height * width
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round((target_area * aspect) ** 0.5)), width)
        h = min(int(round((target_area / aspect) ** 0.5)), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w


def probe_transform(input_size: int, args=None, stats: Stats = IMAGENET) -> Callable:
    """Linear probing's training augmentation (MAE's): single-draw RandomResizedCrop (bicubic), flip;
    the crop's area range and the flip probability from --crop_scale / --hflip (default MAE's)."""
    scale, flip = (tuple(args.crop_scale), args.hflip) if args is not None else ((0.08, 1.0), 0.5)
    return transforms.Compose([
        SingleDrawResizedCrop(input_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(flip),
        transforms.ToTensor(),
        transforms.Normalize(stats.mean, stats.std)])
