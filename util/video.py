"""Clips for video masked modeling: the built-in moving digits, VideoMAE's list files decoded with
PyAV (whose wheels carry FFmpeg, so `pip install -r requirements.txt` is all a machine needs) or with
torchcodec where the system's FFmpeg libraries let it load (--video_decoder), the frame sampling and
VideoMAE's pretraining augmentation. A clip is (3, T, H, W), normalised.

Randomness (the start frame, the crop) comes from the RNGs that util/data.py seeds per (seed,
epoch, index), so clips are reproducible and a run resumes exactly, as with images.
"""
import functools
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from util.data import BadImageError, SkipBadImages, posterize_safely, read_list_file
from util.errors import UserError, optional_import
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


class ClipSampling:
    """Which frames of a video of `total` frames a training clip or the test's temporal views take:
    `dense` (Kinetics): `clip_frames` frames every `sampling_rate`-th, from a random start in training,
    from `views` starts spread evenly over the video at test; `segment` (TSN, Something-Something):
    the video cut into `clip_frames` equal segments, one random frame of each in training, at test
    view v the frame at (v + 0.5) / views of each segment. Returns one list of frame numbers per view."""

    def __init__(self, mode: str, clip_frames: int, sampling_rate: int, train: bool, views: int = 1) -> None:
        if mode not in ("dense", "segment"):
            raise ValueError(f"sampling {mode!r}: use dense or segment")
        self.mode, self.clip_frames, self.sampling_rate = mode, clip_frames, sampling_rate
        self.train, self.views = train, 1 if train else views

    def __call__(self, total: int) -> list[list[int]]:
        t = self.clip_frames
        if self.mode == "segment":
            length = total / t
            if self.train:
                return [[min(int(length * s + random.random() * length), total - 1) for s in range(t)]]
            return [[min(int(length * (s + (v + 0.5) / self.views)), total - 1) for s in range(t)]
                    for v in range(self.views)]
        if self.train:
            return [sample_indices(total, t, self.sampling_rate)]
        span = (t - 1) * self.sampling_rate + 1
        room = max(total - span, 0)
        starts = [room // 2] if self.views == 1 else [round(v * room / (self.views - 1)) for v in range(self.views)]
        return [[min(s + i * self.sampling_rate, total - 1) for i in range(t)] for s in starts]


VIDEO_DECODERS = ("auto", "pyav", "torchcodec")


@functools.cache
def torchcodec_error() -> str | None:
    """Why torchcodec cannot decode here (None: it can), checked once per process by decoding a tiny
    video: its wheel installs anywhere, but it loads the system's FFmpeg libraries only when first
    used, and a fresh machine lacks them."""
    try:
        from torchcodec.decoders import VideoDecoder
        VideoDecoder(_tiny_video(), seek_mode="exact").get_frame_at(0)
    except Exception as exc:   # ImportError without the package; RuntimeError without FFmpeg
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _tiny_video() -> bytes:
    """Two 16 x 16 frames as an MPEG-4 file, written by PyAV."""
    import io

    av = optional_import("av", "av", "decoding videos with PyAV")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _first_line(exc: Exception) -> str:
    """An FFmpeg wrapper's message without its source location, on one line."""
    lines = str(exc).strip().splitlines()
    return re.sub(r"^.*\.(cpp|h):\d+, ", "", lines[0] if lines else "")[:160]


def resolve_video_decoder(name: str) -> str:
    """--video_decoder: "auto" is torchcodec where it loads (faster on VP9 webm, as fast on H.264: see
    BENCHMARKS.md), else PyAV; asking for torchcodec where it cannot load stops in one line."""
    if name not in VIDEO_DECODERS:
        raise UserError(f"--video_decoder {name}: unknown; use one of {', '.join(VIDEO_DECODERS)}")
    error = torchcodec_error() if name != "pyav" else None
    if name == "torchcodec" and error:
        raise UserError(f"--video_decoder torchcodec: it does not load here ({error}); install it and the system's "
                        f"FFmpeg libraries (pip install torchcodec; apt-get install ffmpeg), or use "
                        f"--video_decoder pyav")
    return "pyav" if name == "pyav" or error else "torchcodec"


def _unreadable(path: str, why: str) -> BadVideoError:
    return BadVideoError(f"{path}: unreadable video ({why}); remove or replace it, or pass --bad_images skip")


def decode_frames(path: str, pick: Callable[[int], list[int]], decoder: str = "auto") -> np.ndarray:
    """The frames `pick(total frames)` names, (len, H, W, 3) uint8 RGB in the order named (repeats
    allowed), any size, frame rate or pixel format; only the frames needed are decoded. `decoder`: a
    --video_decoder choice; both give the same frames (but for odd frame sizes: the FFmpeg builds'
    colour conversions can differ by a few levels there)."""
    if resolve_video_decoder(decoder) == "torchcodec":
        return _decode_torchcodec(path, pick)
    return _decode_pyav(path, pick)


def _decode_torchcodec(path: str, pick: Callable[[int], list[int]]) -> np.ndarray:
    """torchcodec's exact seek mode (the frame count from a scan of the packets, not the header): it
    seeks to the key frame before each run of wanted frames instead of decoding from the start."""
    from torchcodec.decoders import VideoDecoder
    try:
        video = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
        total = video.metadata.num_frames or 0
        frames = video.get_frames_at(pick(total)).data.numpy() if total > 0 else None
    except (RuntimeError, ValueError, IndexError, OSError) as exc:
        raise _unreadable(path, f"{type(exc).__name__}: {_first_line(exc)}") from None
    if frames is None:
        raise _unreadable(path, "no frames")
    return frames


def _decode_pyav(path: str, pick: Callable[[int], list[int]]) -> np.ndarray:
    """Decoded in order up to the last frame needed (nothing after it), only the wanted ones converted."""
    av = optional_import("av", "av", "decoding videos with PyAV")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1   # one thread per loader worker: the workers are the parallelism
            total = stream.frames or int(float(stream.duration * stream.time_base * stream.average_rate)
                                         if stream.duration and stream.average_rate else 0)
            if total <= 0:   # no frame count in the container: count them
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            wanted = pick(total)
            needed, kept, last_needed = set(wanted), {}, max(wanted)
            for number, frame in enumerate(container.decode(stream)):
                if number in needed:
                    kept[number] = frame.to_ndarray(format="rgb24")
                if number >= last_needed:
                    break
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as exc:
        raise _unreadable(path, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    if not kept:
        raise _unreadable(path, "no frames")
    last = kept[max(kept)]   # a frame count the container overstated: the last decoded frame repeats
    return np.stack([kept.get(i, last) for i in wanted])


class VideoListDataset(Dataset):
    """VideoMAE's list files: one `path label` per line (one space, no header), paths relative to
    `root`; for pretraining a line may be a path alone. `sampling` names the frames of each view
    (ClipSampling); a sample is (T, H, W, 3) frames, or (views, T, H, W, 3) for several views."""

    def __init__(self, root: Path, list_file: Path, transform: Callable | None, sampling: ClipSampling,
                 labelled: bool, video_decoder: str = "auto") -> None:
        self.samples = [(str(Path(rel) if Path(rel).is_absolute() else root / rel), label)
                        for _, rel, label in read_list_file(list_file, labelled)]
        missing = [p for p, _ in self.samples if not Path(p).is_file()]
        if missing:
            raise UserError(f"{list_file}: {len(missing)} listed video(s) missing, first {missing[0]}; fix the list "
                            f"or --data_path")
        self.targets = [label for _, label in self.samples]
        self.num_classes = max(self.targets, default=-1) + 1
        self.transform, self.sampling = transform, sampling
        self.decoder = resolve_video_decoder(video_decoder)   # here, so a bad choice stops before any worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        views: list[list[int]] = []

        def pick(total: int) -> list[int]:
            views.extend(self.sampling(total))
            return [i for view in views for i in view]

        frames = decode_frames(path, pick, self.decoder)
        if len(views) > 1:
            frames = frames.reshape(len(views), -1, *frames.shape[1:])
        return (self.transform(frames) if self.transform else frames), label


def build_clip_dataset(data_path: str | None, split: str, transform: Callable | None, clip_frames: int = 16,
                       sampling_rate: int = 4, labelled: bool = True, sampling: ClipSampling | None = None,
                       bad_images: str = "stop", video_decoder: str = "auto") -> Dataset:
    """The built-in moving digits (None; their 16 frames are taken whole), or DIR/<split>.csv
    (VideoMAE's list files), sampled by `sampling` (default: VideoMAE's pretraining clip) and decoded
    by `video_decoder` (--video_decoder). `bad_images` as build_dataset's: "skip" replaces an
    unreadable video (SkipBadImages)."""
    if data_path is None:
        return MovingDigitsClips(split, transform, clip_frames)
    root = Path(data_path)
    list_file = root / f"{split}.csv"
    if not list_file.is_file():
        raise UserError(f"--data_path {root}: no {split}.csv (VideoMAE's list file: one 'path label' per line, paths "
                        f"relative to {root})")
    sampling = sampling or ClipSampling("dense", clip_frames, sampling_rate, train=True)
    dataset = VideoListDataset(root, list_file, transform, sampling, labelled, video_decoder)
    return SkipBadImages(dataset) if bad_images == "skip" else dataset


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


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, T, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 255.0


class ClipNormalisation:
    """What the clip transforms share: the per-channel normalisation of (..., 3, T, H, W) clips."""

    def __init__(self, stats: Stats) -> None:
        self.mean = torch.tensor(stats.mean).view(3, 1, 1, 1)
        self.std = torch.tensor(stats.std).view(3, 1, 1, 1)

    def normalise(self, clips: torch.Tensor) -> torch.Tensor:
        return (clips - self.mean) / self.std


class ClipTransform(ClipNormalisation):
    """(T, H, W, 3) uint8 frames -> (3, T, size, size) normalised: VideoMAE's multi-scale crop (the same
    box for every frame, no flip) for pretraining, else a centre crop of the short side; bilinear.
    `as_uint8`: the cropped and resized clip as uint8 (3, T, size, size), rounded as VideoMAE's uint8
    resize rounds, for `normalise_clips` on the device: a quarter of float32's bytes from the loader's
    workers (32 clips of 16 x 224^2 are 308 MB a step as float32)."""

    def __init__(self, size: int, stats: Stats = IMAGENET, train: bool = True, as_uint8: bool = False) -> None:
        super().__init__(stats)
        self.size, self.train, self.as_uint8 = size, train, as_uint8

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        clip = frames_to_tensor(frames)
        height, width = clip.shape[-2:]
        if self.train:
            top, left, h, w = multiscale_crop_box(height, width, self.size)
        else:
            h = w = min(height, width)
            top, left = (height - h) // 2, (width - w) // 2
        clip = clip[:, :, top:top + h, left:left + w]
        if (h, w) != (self.size, self.size):
            clip = F.interpolate(clip, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.as_uint8:
            return clip.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return self.normalise(clip)


def normalise_clips(clips: torch.Tensor, stats: Stats) -> torch.Tensor:
    """uint8 (N, 3, T, H, W) clips (ClipTransform's `as_uint8`), on any device -> normalised float32."""
    mean, std = stats.tensors(clips.device, 5)
    return (clips.float() / 255.0 - mean) / std


def same_draw_for_each(items: list, fn: Callable) -> list:
    """`fn` on each item with the RNGs (python, numpy, torch) as they were before the first, so a
    random augmentation draws the same operations and magnitudes for every frame of a clip."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    out = []
    for item in items:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        out.append(fn(item))
    return out


def repeat_middle_frame(clips: torch.Tensor) -> torch.Tensor:
    """(..., 3, T, H, W) -> the middle frame T times: the clip as one frame shows it (no motion)."""
    t = clips.shape[-3]
    return clips[..., t // 2:t // 2 + 1, :, :].expand(clips.shape).contiguous()


class FinetuneClipTransform(ClipNormalisation):
    """VideoMAE's fine-tuning augmentation, (T, H, W, 3) uint8 -> (3, T, size, size): RandAugment
    (`aa`) with the same operations and magnitudes on every frame, one random resized crop (area
    `crop_scale`, aspect 3/4 to 4/3, bilinear) and flip (`hflip`) for the whole clip, normalisation,
    then random erasing frame by frame (`reprob`, as VideoMAE erases). `single_frame`: the middle
    frame repeated (see repeat_middle_frame)."""

    def __init__(self, size: int, stats: Stats, aa: str | None, crop_scale: tuple[float, float], hflip: float,
                 reprob: float = 0.0, remode: str = "pixel", recount: int = 1, single_frame: bool = False) -> None:
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.random_erasing import RandomErasing
        from torchvision.transforms import RandomResizedCrop
        super().__init__(stats)
        self.size, self.crop_scale, self.hflip, self.single_frame = size, tuple(crop_scale), hflip, single_frame
        self.augment = None
        if aa:
            img_mean = tuple(min(255, round(255 * m)) for m in stats.mean)
            self.augment = rand_augment_transform(aa, {"translate_const": int(size * 0.45), "img_mean": img_mean})
            posterize_safely(self.augment)
        self.box = RandomResizedCrop.get_params
        self.erase = (RandomErasing(reprob, mode=remode, max_count=recount, num_splits=0, device="cpu") if reprob
                      else None)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if self.augment is not None:
            from PIL import Image
            frames = np.stack([np.asarray(img) for img in
                               same_draw_for_each([Image.fromarray(f) for f in frames], self.augment)])
        clip = frames_to_tensor(frames)
        top, left, h, w = self.box(clip[:, 0], self.crop_scale, (3 / 4, 4 / 3))
        clip = F.interpolate(clip[:, :, top:top + h, left:left + w], size=(self.size, self.size), mode="bilinear",
                             align_corners=False)
        if random.random() < self.hflip:
            clip = clip.flip(-1)
        clip = self.normalise(clip)
        if self.erase is not None:
            clip = self.erase(clip.transpose(0, 1).contiguous()).transpose(0, 1)   # (T, 3, H, W): per frame
        return repeat_middle_frame(clip) if self.single_frame else clip.contiguous()


class ClipViews(ClipNormalisation):
    """The test's views of a video, (views, T, H, W, 3) or (T, H, W, 3) uint8 -> (views x crops, 3, T,
    size, size): the short side resized to `size` (bilinear), then `crops` crops along the long side
    (1: the centre; 3: both ends and the centre), normalised. `single_frame` as FinetuneClipTransform."""

    def __init__(self, size: int, stats: Stats, crops: int = 1, single_frame: bool = False) -> None:
        super().__init__(stats)
        self.size, self.crops, self.single_frame = size, crops, single_frame

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        views = frames if frames.ndim == 5 else frames[None]
        out = []
        for view in views:
            clip = frames_to_tensor(view)
            height, width = clip.shape[-2:]
            scale = self.size / min(height, width)
            new_h, new_w = max(self.size, round(height * scale)), max(self.size, round(width * scale))
            if (new_h, new_w) != (height, width):
                clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
            room_h, room_w = new_h - self.size, new_w - self.size
            for c in range(self.crops):
                where = 0.5 if self.crops == 1 else c / (self.crops - 1)
                top, left = (round(room_h * where), round(room_w * 0.5)) if room_h > room_w else \
                            (round(room_h * 0.5), round(room_w * where))
                out.append(clip[:, :, top:top + self.size, left:left + self.size])
        clips = self.normalise(torch.stack(out))
        return repeat_middle_frame(clips) if self.single_frame else clips


def finetune_clip_transform(size: int, args, stats: Stats = IMAGENET) -> FinetuneClipTransform:
    """Fine-tuning's clip augmentation from main_finetune's flags (--aa, --crop_scale, --hflip,
    --reprob, --remode, --recount, --single_frame)."""
    return FinetuneClipTransform(size, stats, args.aa, args.crop_scale, args.hflip, args.reprob, args.remode,
                                 args.recount, args.single_frame)


def probe_clip_transform(size: int, args, stats: Stats = IMAGENET) -> FinetuneClipTransform:
    """Linear probing's clip augmentation: the random resized crop and flip alone, as for images."""
    return FinetuneClipTransform(size, stats, None, args.crop_scale, args.hflip, single_frame=args.single_frame)


def clip_dataset(args, split: str, transform: Callable, frames: int, train: bool):
    """A video classifier's `split`: the built-in moving digits or DIR/<split>.csv, sampled by
    --sampling (training: one random clip; validation: --test_clips views), --bad_images and
    --video_decoder honoured."""
    sampling = ClipSampling(args.sampling, frames, args.sampling_rate, train=train, views=args.test_clips)
    if train and getattr(args, "num_sample", 1) > 1:
        transform = RepeatedAugment(transform, args.num_sample)
    return build_clip_dataset(args.data_path, split, transform, frames, labelled=True, sampling=sampling,
                              bad_images=args.bad_images, video_decoder=args.video_decoder)


class RepeatedAugment:
    """VideoMAE's repeated augmentation (--num_sample): one decoded clip, `n` independent
    augmentations of it, stacked (n, ...); `stacked_views_collate` makes them n batch entries."""

    def __init__(self, transform: Callable, n: int) -> None:
        self.transform, self.n = transform, n

    def __call__(self, frames):
        return torch.stack([self.transform(frames) for _ in range(self.n)])


def stacked_views_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[(n, ...) samples, label] -> (B x n, ...) inputs, each label repeated n times."""
    inputs = torch.stack([sample for sample, _ in batch])
    labels = torch.tensor([label for _, label in batch]).repeat_interleave(inputs.shape[1])
    return inputs.flatten(0, 1), labels
