"""Datasets (built-in digits, ImageFolder, unlabelled image trees, UM-MAE list files, and through
util/shards.py and util/hf_data.py WebDataset shards and Hugging Face datasets), robust image
loading, loaders.

Augmentation randomness is seeded per sample from (seed, epoch, index), so a run resumed at an
epoch boundary sees exactly the crops and flips of an uninterrupted one, whatever the workers.
"""
import copy
import itertools
import logging
import os
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
from util.shards import ShardDataset, shard_files

log = logging.getLogger("hpm")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(UserError):
    """An image file that cannot be decoded."""


def load_rgb(path, name: str | None = None) -> Image.Image:
    """Open any image (a path, or a file object named `name` in errors) as 8-bit RGB: greyscale,
    palette, CMYK, RGBA and 16-bit files included."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{name or path}: unreadable image ({exc}); remove or replace it, or pass "
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


class ImageFiles(Dataset):
    """Images read from `samples`, a list of (path, label)."""

    samples: list[tuple[str, int]]
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


def read_list_file(list_file: Path, labelled: bool) -> list[tuple[int, str, int]]:
    """(line number, path, label) of each 'path label' line of a list file (UM-MAE's, VideoMAE's);
    unless `labelled`, a line may be a path alone (label -1)."""
    entries = []
    for num, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            entries.append((num, parts[0], int(parts[1])))
        elif labelled:
            raise UserError(f"{list_file}:{num}: expected 'relative/path label', found {line.strip()!r}; this "
                            f"script needs labels (pretraining takes paths alone)")
        else:
            entries.append((num, line.strip(), -1))
    return entries


class ImageListDataset(ImageFiles):
    """UM-MAE's list format: one 'relative/path label' per line, paths relative to `root`; for
    pretraining (`labelled` False) a line may be a path alone (label -1)."""

    def __init__(self, root: Path, list_file: Path, transform: Callable | None = None, labelled: bool = True) -> None:
        self.samples: list[tuple[str, int]] = []
        missing = []
        for num, rel, label in read_list_file(list_file, labelled):
            path = root / rel
            if not path.is_file():
                missing.append(f"{rel} (line {num})")
            self.samples.append((str(path), label))
        if missing:
            raise UserError(f"{list_file}: {len(missing)} listed file(s) missing under {root}, first "
                            f"{missing[0]}; fix the list or the data path")
        self.targets = [label for _, label in self.samples]
        self.num_classes = max(self.targets, default=-1) + 1
        self.transform = transform


class ImageTree(ImageFiles):
    """Every image below `root`, at any depth, in sorted path order, without labels (-1): what
    pretraining reads from a folder of one's own images."""

    def __init__(self, root: Path, transform: Callable | None = None) -> None:
        self.samples = [(os.path.join(folder, name), -1)
                        for folder, subfolders, names in sorted_walk(root)
                        for name in sorted(names) if name.lower().endswith(IMG_EXTENSIONS)]
        self.targets = [-1] * len(self.samples)
        self.num_classes = 0
        self.transform = transform


def sorted_walk(root: Path):
    """os.walk in sorted order (links followed), so the image order is the same on every machine."""
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        yield folder, subfolders, names


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


def build_dataset(data_path: str | None, split: str, transform: Callable | None, bad_images: str = "stop",
                  labelled: bool = True, image_column: str = "image", label_column: str = "label") -> Dataset:
    """The `split` of any source --data_path names:

    - None: the built-in digits;
    - hf:DIR: a local Hugging Face dataset (save_to_disk or Parquet; util/hf_data.py);
    - WebDataset shards: a brace pattern, a .tar, a folder of .tar or DIR/<split>/*.tar (util/shards.py);
    - DIR/<split>.txt: a list of 'path label' lines (paths alone for pretraining);
    - DIR/<split>/: an ImageFolder (<class>/<images>); unlabelled (`labelled` False, pretraining):
      every image below DIR/<split>/, or below DIR itself when it has no <split>/, at any depth.

    `bad_images`: "stop" raises on an unreadable image, "skip" replaces it (see SkipBadImages).
    """
    if data_path is None:
        dataset = DigitsDataset(split, transform)
    elif data_path.startswith("hf:"):
        from util.hf_data import HFImageDataset
        dataset = HFImageDataset(data_path[3:], split, transform, image_column, label_column, labelled)
    elif (shards := shard_files(data_path, split)) is not None:
        dataset = ShardDataset(shards, transform, labelled)
    else:
        dataset = _folder_dataset(Path(data_path), split, transform, labelled)
    if len(dataset) == 0:
        raise UserError(f"--data_path {data_path}: the {split} split is empty")
    return SkipBadImages(dataset) if bad_images == "skip" else dataset


def _folder_dataset(root: Path, split: str, transform: Callable | None, labelled: bool) -> Dataset:
    hint = (f"expected {root}/{split}/<class>/<images> or a list file {root}/{split}.txt" if labelled else
            f"expected images below {root} (or {root}/{split}/), or a list file {root}/{split}.txt")
    if not root.is_dir():
        raise UserError(f"--data_path {root}: no such directory; {hint}")
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        base = root / split if (root / split).is_dir() else root
        return ImageListDataset(base, list_file, transform, labelled)
    if not labelled:
        tree = ImageTree(root / split if (root / split).is_dir() else root, transform)
        if len(tree) == 0:
            raise UserError(f"--data_path {root}: no images ({', '.join(IMG_EXTENSIONS)}) found; {hint}")
        return tree
    if not (root / split).is_dir():
        raise UserError(f"--data_path {root}: found neither {split}/ nor {split}.txt; {hint}")
    try:
        dataset = datasets.ImageFolder(str(root / split), transform=transform, loader=load_rgb,
                                       is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))
    except FileNotFoundError as exc:
        raise UserError(f"--data_path {root}: this script needs labels, and {root}/{split} has no class folders "
                        f"({str(exc).splitlines()[0]}); {hint} (pretraining takes unlabelled images)") from None
    dataset.num_classes = len(dataset.classes)
    return dataset


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
    """Shuffled (per seed and epoch), drop-last, reproducible loader; call sampler.set_epoch each epoch.

    Each epoch is one permutation of the whole dataset, split across the processes (and, in whole
    batches, their workers): every sample at most once. Where the dataset does not divide into
    processes x batch, the permutation's tail is left out (logged once), a different tail each epoch."""
    world = dist_info.world_size
    if batch_size * world > len(dataset):
        raise UserError(f"--batch_size {batch_size} x {world} process(es) is larger than the "
                        f"{len(dataset)} training images: lower --batch_size")
    used = world * batch_size * (len(dataset) // world // batch_size)
    if used < len(dataset) and dist_info.is_main:
        log.info(f"each epoch uses {used} of the {len(dataset)} training images: the remainder over {world} "
                 f"process(es) x batch {batch_size} ({len(dataset) - used}) is left out, a different one every "
                 f"epoch (each epoch reshuffles)")
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
            posterize_safely(step)
    return transform


def posterize_safely(augment) -> None:
    """Make a timm RandAugment's Posterize ops accept 0 bits (see posterize_any_bits)."""
    for op in augment.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_any_bits


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
