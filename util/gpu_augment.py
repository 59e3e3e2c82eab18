"""Pretraining augmentation on the GPU (`--gpu_decode`), for when the CPU loader cannot keep up:
the loader's workers only read the JPEG files' bytes (and decode on the CPU the few files nvJPEG
should not get: `device_decodable`); the batch is decoded on the device
(`torchvision.io.decode_jpeg`, nvJPEG on CUDA) and cropped, resized, flipped and normalised
there. The crop boxes follow torchvision's RandomResizedCrop exactly (ten tries at a random
area and log-ratio, else the centre crop at the clamped ratio), drawn for the whole batch at once
from the run's own generator; resizing is bicubic with antialiasing, as on the CPU path, for the
whole batch in a few kernels (`resized_crops`).
On a CPU device the same code decodes on the CPU, which is how it is tested."""
import io
import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from util.data import SkipBadImages, load_rgb
from util.errors import UserError
from util.normalization import IMAGENET, Stats

log = logging.getLogger("hpm")

JPEG_MAGIC = b"\xff\xd8"
TRIES = 10
DEVICE_FRAMES = (0xC0, 0xC1, 0xC2)   # baseline, extended and progressive Huffman-coded frames


def device_decodable(raw: bytes) -> bool:
    """Whether nvJPEG should get these bytes: a complete (ending in EOI) 8-bit baseline, extended or
    progressive JPEG of 3 components. Anything else (a PNG named .JPEG, CMYK and YCCK, greyscale,
    arithmetic-coded, lossless, 12-bit or truncated files) is decoded on the CPU instead, by the
    loader's worker, as the CPU path would: torchvision's CUDA decoder does not enable nvJPEG's CMYK
    support, and one file nvJPEG refuses would otherwise end the batch."""
    if raw[:2] != JPEG_MAGIC or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return False
        marker = raw[i + 1]
        if marker == 0xFF:   # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # the frame header
            return marker in DEVICE_FRAMES and i + 9 < len(raw) and raw[i + 4] == 8 and raw[i + 9] == 3
        elif marker == 0xDA:   # a scan before any frame header
            return False
        else:
            i += 2 + int.from_bytes(raw[i + 2:i + 4], "big")
    return False


class JpegBytes(Dataset):
    """Each image as its file's bytes, for the device to decode (`device_decodable`), or else decoded
    here on the CPU to uint8 (3, H, W): the files of an image folder or list, the members of WebDataset
    shards, the image column of a Hugging Face dataset. An image the CPU cannot read either raises
    BadImageError, which `--bad_images skip` handles as on the CPU path (`jpeg_bytes`).
    -> (bytes or pixels, label, encoded, name)."""

    def __init__(self, dataset: Dataset) -> None:
        self.samples = getattr(dataset, "samples", None)
        self.source = dataset if hasattr(dataset, "raw_sample") else None
        if self.samples is None and self.source is None:
            raise UserError("--gpu_decode reads JPEG files: give --data_path (the built-in digits have no files)")

    def __len__(self) -> int:
        return len(self.source) if self.source is not None else len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool, str]:
        if self.source is not None:
            (raw, label), name = self.source.raw_sample(index), self.source.name(index)
        else:
            path, label = self.samples[index]
            raw, name = Path(path).read_bytes(), str(path)
        if device_decodable(raw):
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), label, True, name
        pixels = np.array(load_rgb(io.BytesIO(raw), name))
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label, False, name


def jpeg_bytes(dataset: Dataset) -> Dataset:
    """`dataset`'s images as JpegBytes, keeping `--bad_images skip` (SkipBadImages) around them."""
    if isinstance(dataset, SkipBadImages):
        return SkipBadImages(JpegBytes(dataset.dataset))
    return JpegBytes(dataset)


class JpegBatch(NamedTuple):
    """A batch as it leaves the loader's workers: the JPEG bytes of every device-decoded image in one
    flat tensor (two shared-memory segments for the whole batch, not one per image, which ran out of
    file descriptors at 512 images), and the few images the workers decoded on the CPU."""
    data: torch.Tensor            # (B,) uint8: the JPEGs' bytes, one after another
    offsets: torch.Tensor         # (J + 1,) int64: JPEG j is data[offsets[j]:offsets[j + 1]]
    encoded: torch.Tensor         # (N,) bool: image i is the next JPEG (True) or the next of `decoded`
    decoded: list[torch.Tensor]   # uint8 (3, H, W) images decoded by the workers, in batch order
    names: list[str]              # every image's file, for errors

    def __len__(self) -> int:
        return len(self.names)


def collate_bytes(batch: list[tuple[torch.Tensor, int, bool, str]]) -> tuple[JpegBatch, torch.Tensor]:
    jpegs = [data for data, _, encoded, _ in batch if encoded]
    sizes = torch.tensor([0] + [len(data) for data in jpegs], dtype=torch.int64)
    flat = torch.cat(jpegs) if jpegs else torch.zeros(0, dtype=torch.uint8)
    return (JpegBatch(flat, sizes.cumsum(0), torch.tensor([item[2] for item in batch]),
                      [data for data, _, encoded, _ in batch if not encoded], [item[3] for item in batch]),
            torch.tensor([label for _, label, _, _ in batch]))


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for a batch: (N,) sizes -> (N, 4) top, left, h, w."""
    n, device = heights.shape[0], heights.device
    area = (heights * widths).double()
    log_ratio = torch.tensor([math.log(ratio[0]), math.log(ratio[1])], dtype=torch.double)
    u = torch.rand(n, TRIES, 2, device=device, generator=generator, dtype=torch.double)
    target_area = area[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=device))
    offsets = torch.rand(n, TRIES, 2, device=device, generator=generator, dtype=torch.double)
    idx = first.clamp_min(0)[:, None]
    h_try, w_try = h.gather(1, idx)[:, 0], w.gather(1, idx)[:, 0]
    top = (offsets[..., 0].gather(1, idx)[:, 0] * (heights - h_try + 1)).floor().long()
    left = (offsets[..., 1].gather(1, idx)[:, 0] * (widths - w_try + 1)).floor().long()
    # fallback: the centre crop at the ratio clamped into `ratio`
    in_ratio = widths.double() / heights.double()
    w_fb = torch.where(in_ratio < ratio[0], widths.double(),
                       torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths.double())).long()
    h_fb = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]),
                       torch.where(in_ratio > ratio[1], heights.double(), heights.double())).long()
    found = first >= 0
    h_out, w_out = torch.where(found, h_try, h_fb), torch.where(found, w_try, w_fb)
    top = torch.where(found, top, (heights - h_fb) // 2)
    left = torch.where(found, left, (widths - w_fb) // 2)
    return torch.stack([top, left, h_out, w_out], dim=1)


def decode_jpegs(data: list[torch.Tensor], device: torch.device, stream=None) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, H_i, W_i) images on `device` (its index kept: cuda:1 decodes there).

    nvJPEG writes its outputs on a private stream that does not wait for the caller's, while the
    outputs are allocated on the stream that is current. With `stream` (a stream of our own) current
    during the decode, the outputs come from that stream's memory pool, never from blocks the
    training stream freed but may still read; the training stream then waits for the decode, and
    the images are marked as used there, so their memory is recycled only after that use."""
    mode = torchvision.io.ImageReadMode.RGB
    if device.type != "cuda":
        return torchvision.io.decode_jpeg(data, mode=mode, device="cpu")
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        images = torchvision.io.decode_jpeg(data, mode=mode, device=device)
    current.wait_stream(stream)
    for image in images:
        image.record_stream(current)
    return images


class GpuPretrainAugment:
    """Decode + RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + normalise, on `device`.

    The crop boxes are drawn on the host (from the images' shapes, which the host knows, with a CPU
    generator), so a step needs no host-device synchronisation; the flips are drawn on the device."""

    def __init__(self, size: int, device: torch.device, stats: Stats = IMAGENET,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 skip_bad_images: bool = False) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.size, self.device, self.scale, self.ratio = size, device, scale, ratio
        self.skip = skip_bad_images
        self.mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
        self.decode_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def decode(self, batch: JpegBatch) -> list[torch.Tensor]:
        """A loader batch -> its uint8 (3, H_i, W_i) images on the device, in batch order: the JPEGs
        decoded there, the workers' CPU-decoded images copied over."""
        sizes = (batch.offsets[1:] - batch.offsets[:-1]).tolist()
        encoded = batch.encoded.tolist()
        names = [name for name, e in zip(batch.names, encoded) if e]
        jpegs = iter(self.decode_all(list(batch.data.split(sizes)), names) if sizes else [])
        pixels = iter(batch.decoded)
        return [next(jpegs) if e else next(pixels).to(self.device, non_blocking=True) for e in encoded]

    def decode_one(self, data: torch.Tensor, name: str) -> torch.Tensor | None:
        """One JPEG on the device; one the decoder refuses stops the run naming it, or (`--bad_images
        skip`) is None, with a warning naming it."""
        try:
            return decode_jpegs([data], self.device, self.decode_stream)[0]
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rsplit(", ", 1)[-1][:160]
            if not self.skip:
                raise UserError(f"{name}: the device's JPEG decoder cannot read it ({reason}); pass "
                                f"--bad_images skip to replace it, or drop --gpu_decode") from None
            log.warning(f"skipped: {name}: the device's JPEG decoder cannot read it ({reason}); replaced by another "
                        f"image of the batch")
            return None

    def decode_all(self, jpegs: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """The batch's JPEGs in one decode; if the decoder refuses the batch, image by image, where one
        it refuses stops the run naming its file, or (`--bad_images skip`) is replaced by another image
        of the batch with a warning naming it."""
        try:
            return decode_jpegs(jpegs, self.device, self.decode_stream)
        except RuntimeError:   # one refused image fails the whole batch: find it
            images = [self.decode_one(data, name) for data, name in zip(jpegs, names)]
        good = next((image for image in images if image is not None), None)
        if good is None:
            raise UserError(f"none of the batch's JPEGs decodes on the device (first: {names[0]}); check "
                            f"--data_path, or drop --gpu_decode")
        return [image if image is not None else good for image in images]

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator | None = None,
                 box_generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (3, H_i, W_i) images -> (N, 3, size, size) float, normalised. `generator`: the flips'
        (on the device), `box_generator`: the crop boxes' (on the CPU)."""
        sizes = torch.tensor([img.shape[-2:] for img in images])
        boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], self.scale, self.ratio, box_generator)
        crops = resized_crops(images, boxes, self.size)
        flip = torch.rand(len(images), device=self.device, generator=generator) < 0.5
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        return (crops / 255.0 - self.mean) / self.std


PIXELS_PER_GROUP = 2**25   # padded pixels resampled at once: 384 MiB as float32 x 3 channels


def bicubic_aa_weights(starts: torch.Tensor, lengths: torch.Tensor, out_size: int, padded: int) -> torch.Tensor:
    """(G,) crop starts and lengths along one axis -> (G, out_size, padded) resampling matrices: the
    antialiased bicubic filter of PIL (a = -0.5, widened by the downscaling factor, rows normalised,
    cut at the crop's edges), which torchvision's `antialias=True` bicubic resize also uses."""
    device = starts.device
    scale = (lengths.double() / out_size).view(-1, 1, 1)
    center = starts.double().view(-1, 1, 1) + scale * (torch.arange(out_size, device=device, dtype=torch.double)
                                                       .view(1, -1, 1) + 0.5)
    j = torch.arange(padded, device=device, dtype=torch.double).view(1, 1, -1)
    x = ((j + 0.5 - center) / scale.clamp(min=1.0)).abs()
    a = -0.5
    w = torch.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    torch.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, torch.zeros_like(x)))
    inside = (j >= starts.view(-1, 1, 1)) & (j < (starts + lengths).view(-1, 1, 1))
    w = w * inside
    return (w / w.sum(-1, keepdim=True)).float()


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H_i, W_i) images, (N, 4) top/left/height/width boxes -> (N, 3, size, size) float in
    [0, 255]: each box resized (antialiased bicubic, as torchvision's resized_crop, rounded as its uint8
    output is) with a handful of kernels for the whole batch instead of several per image. Images are
    grouped by area and padded to their group's largest, so that one oversized image does not pad
    the batch; each group is two batched matrix products with per-image resampling matrices."""
    device = images[0].device
    order = sorted(range(len(images)), key=lambda i: images[i].shape[-2] * images[i].shape[-1])
    out = torch.empty(len(images), 3, size, size, device=device)

    def to_device(host: torch.Tensor) -> torch.Tensor:   # pinned and asynchronous: no host-device sync
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host

    boxes = to_device(boxes)
    group: list[int] = []
    tallest = widest = 0
    for index in order + [None]:
        if index is not None:
            height, width = images[index].shape[-2:]
            if not group or (len(group) + 1) * max(tallest, height) * max(widest, width) <= PIXELS_PER_GROUP:
                group.append(index)
                tallest, widest = max(tallest, height), max(widest, width)
                continue
        with warnings.catch_warnings():   # nested tensors: "prototype stage", used here only to pad
            warnings.simplefilter("ignore", UserWarning)
            padded = torch.nested.as_nested_tensor([images[i] for i in group]).to_padded_tensor(0).float()
        g = to_device(torch.tensor(group))
        top, left, h, w = boxes[g].unbind(1)
        rows = bicubic_aa_weights(top, h, size, padded.shape[-2])
        cols = bicubic_aa_weights(left, w, size, padded.shape[-1])
        out[g] = (rows.unsqueeze(1) @ padded @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)
        if index is not None:
            group, (tallest, widest) = [index], images[index].shape[-2:]
    return out
