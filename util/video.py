"""Clips for video masked modeling: the built-in moving digits, VideoMAE's list files decoded with
PyAV (whose wheels carry FFmpeg, so `pip install -r requirements.txt` is all a machine needs), the
frame sampling and VideoMAE's pretraining augmentation. A clip is (3, T, H, W), normalised.

Randomness (the start frame, the crop) comes from the RNGs that util/data.py seeds per (seed,
epoch, index), so clips are reproducible and a run resumes exactly, as with images.
"""
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from util.data import BadImageError, read_list_file
from util.errors import UserError
from util.normalization import IMAGENET, Stats

DIRECTIONS = 8   # the built-in clips move one of 8 ways (the label): a single frame cannot tell which


class BadVideoError(BadImageError):
    """A video that cannot be decoded (skipped like an unreadable image under --bad_images skip)."""


class MovingDigitsClips(Dataset):
    """The built-in clips: one of scikit-learn's digits (12 x 12) moving across a 32 x 32 frame, 16
    frames, in one of 8 directions at a speed of 1 or 2 pixels a frame, bouncing off the edges. The
    label is the direction. Each clip is fixed by its index (the digits' 80/20 split, as the images)."""

    num_classes = DIRECTIONS

    def __init__(self, split: str, transform: Callable | None = None, frames: int = 16, size: int = 32) -> None:
        from util.data import DigitsDataset
        self.digits = [np.asarray(img.convert("L").resize((12, 12)), dtype=np.float32) / 255.0
                       for img in DigitsDataset(split, size=32).images]
        self.frames, self.size, self.transform = frames, size, transform
        self.targets = [i % DIRECTIONS for i in range(len(self.digits))]

    def __len__(self) -> int:
        return len(self.digits)

    def clip(self, index: int) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of clip `index`."""
        rng = np.random.RandomState(index)
        angle = 2 * np.pi * self.targets[index] / DIRECTIONS
        speed = 1 + rng.randint(2)
        step = np.array([np.sin(angle), np.cos(angle)]) * speed
        span = self.size - 12
        pos = rng.uniform(0, span, 2)
        frames = np.zeros((self.frames, self.size, self.size), dtype=np.float32)
        for t in range(self.frames):
            y, x = np.round(pos).astype(int)
            frames[t, y:y + 12, x:x + 12] = self.digits[index]
            pos = pos + step
            for axis in range(2):   # bounce
                if not 0 <= pos[axis] <= span:
                    step[axis] = -step[axis]
                    pos[axis] = np.clip(pos[axis], 0, span)
        return np.repeat((frames * 255).round().astype(np.uint8)[..., None], 3, axis=-1)

    def __getitem__(self, index: int):
        frames = self.clip(index)
        return (self.transform(frames) if self.transform else frames), self.targets[index]


def sample_indices(num_frames: int, clip_frames: int, sampling_rate: int) -> list[int]:
    """VideoMAE's pretraining sampling: one uniformly random start, then every `sampling_rate`-th
    frame; in a video shorter than the clip's span the index stops at the last frame (frames repeat)."""
    span = (clip_frames - 1) * sampling_rate + 1
    start = random.randint(0, num_frames - span) if num_frames >= span else 0
    return [min(start + i * sampling_rate, num_frames - 1) for i in range(clip_frames)]


def decode_frames(path: str, clip_frames: int, sampling_rate: int) -> np.ndarray:
    """The sampled frames of a video file, (T, H, W, 3) uint8 RGB: decoded in order up to the last
    frame the clip needs (nothing after it), any size, frame rate or pixel format."""
    import av
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            total = stream.frames or int(float(stream.duration * stream.time_base * stream.average_rate)
                                         if stream.duration and stream.average_rate else 0)
            if total <= 0:   # no frame count in the container: count them
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            wanted = sample_indices(total, clip_frames, sampling_rate)
            needed, kept = set(wanted), {}
            for number, frame in enumerate(container.decode(stream)):
                if number in needed:
                    kept[number] = frame.to_ndarray(format="rgb24")
                if number >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as exc:
        raise BadVideoError(f"{path}: unreadable video ({type(exc).__name__}: {str(exc)[:120]}); remove or "
                            f"replace it, or pass --bad_images skip") from None
    if not kept:
        raise BadVideoError(f"{path}: unreadable video (no frames); remove or replace it, or pass --bad_images skip")
    last = kept[max(kept)]   # a frame count the container overstated: the last decoded frame repeats
    return np.stack([kept.get(i, last) for i in wanted])


class VideoListDataset(Dataset):
    """VideoMAE's list files: one `path label` per line (one space, no header), paths relative to
    `root`; for pretraining a line may be a path alone."""

    def __init__(self, root: Path, list_file: Path, transform: Callable | None, clip_frames: int, sampling_rate: int,
                 labelled: bool) -> None:
        self.samples = [(str(Path(rel) if Path(rel).is_absolute() else root / rel), label)
                        for _, rel, label in read_list_file(list_file, labelled)]
        missing = [p for p, _ in self.samples if not Path(p).is_file()]
        if missing:
            raise UserError(f"{list_file}: {len(missing)} listed video(s) missing, first {missing[0]}; fix the list "
                            f"or --data_path")
        self.targets = [label for _, label in self.samples]
        self.num_classes = max(self.targets, default=-1) + 1
        self.transform, self.clip_frames, self.sampling_rate = transform, clip_frames, sampling_rate

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        frames = decode_frames(path, self.clip_frames, self.sampling_rate)
        return (self.transform(frames) if self.transform else frames), label


def build_clip_dataset(data_path: str | None, split: str, transform: Callable | None, clip_frames: int = 16,
                       sampling_rate: int = 4, labelled: bool = True) -> Dataset:
    """The built-in moving digits (None), or DIR/<split>.csv (VideoMAE's list files)."""
    if data_path is None:
        return MovingDigitsClips(split, transform, clip_frames)
    root = Path(data_path)
    list_file = root / f"{split}.csv"
    if not list_file.is_file():
        raise UserError(f"--data_path {root}: no {split}.csv (VideoMAE's list file: one 'path label' per line, paths "
                        f"relative to {root})")
    return VideoListDataset(root, list_file, transform, clip_frames, sampling_rate, labelled)


SCALES = (1.0, 0.875, 0.75, 0.66)


def multiscale_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """VideoMAE's multi-scale crop: width and height each one of (1, .875, .75, .66) x the short side
    (at most one step apart), placed at one of 13 fixed offsets (corners, centre, edge centres,
    quarter points). -> top, left, crop height, crop width."""
    base = min(height, width)
    sizes = [int(base * s) for s in SCALES]
    sizes = [size if abs(s - size) < 3 else s for s in sizes]
    pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= 1]
    crop_h, crop_w = random.choice(pairs)
    dy, dx = (height - crop_h) // 4, (width - crop_w) // 4
    offsets = [(0, 0), (0, 4 * dx), (4 * dy, 0), (4 * dy, 4 * dx), (2 * dy, 2 * dx), (0, 2 * dx), (4 * dy, 2 * dx),
               (2 * dy, 0), (2 * dy, 4 * dx), (dy, dx), (dy, 3 * dx), (3 * dy, dx), (3 * dy, 3 * dx)]
    top, left = random.choice(offsets)
    return top, left, crop_h, crop_w


class ClipTransform:
    """(T, H, W, 3) uint8 frames -> (3, T, size, size) normalised: VideoMAE's multi-scale crop (the same
    box for every frame, no flip) for pretraining, else a centre crop of the short side; bilinear."""

    def __init__(self, size: int, stats: Stats = IMAGENET, train: bool = True) -> None:
        self.size, self.train = size, train
        self.mean = torch.tensor(stats.mean).view(3, 1, 1, 1)
        self.std = torch.tensor(stats.std).view(3, 1, 1, 1)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 255.0   # (3, T, H, W)
        height, width = clip.shape[-2:]
        if self.train:
            top, left, h, w = multiscale_crop_box(height, width, self.size)
        else:
            h = w = min(height, width)
            top, left = (height - h) // 2, (width - w) // 2
        clip = clip[:, :, top:top + h, left:left + w]
        if (h, w) != (self.size, self.size):
            clip = F.interpolate(clip, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (clip - self.mean) / self.std
