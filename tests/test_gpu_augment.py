"""The --gpu_decode augmentation path, run on CPU tensors: the same crop distribution as
torchvision's RandomResizedCrop, the same output range, and a pretraining run through it."""
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2  # noqa: F401 - transforms.v2 below

from tests.helpers import REPO, run_script
from util.data import build_dataset, load_rgb
from util.errors import UserError
from util.gpu_augment import (
    GpuPretrainAugment,
    JpegBytes,
    collate_bytes,
    device_decodable,
    jpeg_bytes,
    sample_crop_boxes,
)
from util.normalization import IMAGENET

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def _torchvision_boxes(height: int, width: int, n: int) -> torch.Tensor:
    img = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    return torch.tensor([transforms.RandomResizedCrop.get_params(img, SCALE, RATIO) for _ in range(n)])


@pytest.mark.parametrize("height, width", [(224, 224), (375, 500), (40, 400), (500, 20)])
def test_crop_boxes_follow_torchvisions_distribution(height, width):
    n = 4000
    ours = sample_crop_boxes(torch.full((n,), height), torch.full((n,), width), SCALE, RATIO,
                             torch.Generator().manual_seed(1))
    theirs = _torchvision_boxes(height, width, n)
    for boxes in (ours, theirs):                       # every box inside the image
        top, left, h, w = boxes.T
        assert torch.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h > 0) & (w > 0))

    def summary(boxes):
        top, left, h, w = boxes.T.double()
        area = h * w / (height * width)
        return torch.stack([area.mean(), area.std(), torch.log(w / h).mean(), torch.log(w / h).std(),
                            ((top + h / 2) / height).mean(), ((left + w / 2) / width).mean()])
    assert torch.allclose(summary(ours), summary(theirs), atol=0.03), (summary(ours), summary(theirs))
    def full(b):   # the fallback's share
        return (b[:, 2] * b[:, 3] == (b[:, 2] * b[:, 3]).max()).double().mean()
    assert abs(full(ours) - full(theirs)) < 0.03


def _jpeg_bytes(arr: np.ndarray) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_output_range_and_values_match_the_cpu_pipeline():
    rng = np.random.RandomState(0)
    arrays = [np.clip(rng.normal(128, 50, (h, w, 3)), 0, 255).astype(np.uint8)
              for h, w in ((60, 80), (90, 45), (64, 64))]
    augment = GpuPretrainAugment(32, torch.device("cpu"), IMAGENET)
    decoded = augment.decode(collate_bytes([(_jpeg_bytes(a), 0, True, f"{i}.jpg") for i, a in enumerate(arrays)])[0])
    out = augment(decoded, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    low = (0 - torch.tensor(IMAGENET.mean)) / torch.tensor(IMAGENET.std)
    high = (1 - torch.tensor(IMAGENET.mean)) / torch.tensor(IMAGENET.std)
    assert torch.all(out >= low.view(1, 3, 1, 1) - 1e-5) and torch.all(out <= high.view(1, 3, 1, 1) + 1e-5)
    # the same box through both pipelines: PIL bicubic on the CPU path, antialiased tensor bicubic here
    img = decoded[0]
    pil = transforms.functional.resized_crop(transforms.functional.to_pil_image(img), 5, 7, 40, 50, [32, 32],
                                             transforms.InterpolationMode.BICUBIC)
    ours = transforms.v2.functional.resized_crop(img, 5, 7, 40, 50, [32, 32], antialias=True,
                                                 interpolation=transforms.InterpolationMode.BICUBIC)
    diff = (transforms.functional.pil_to_tensor(pil).float() - ours.float()).abs().mean() / 255
    assert diff < 0.02


def _odd_files(root) -> dict[str, bool]:
    """ImageNet's kinds of files in one folder: file name -> whether it goes to the device decoder."""
    folder = root / "train" / "c"
    folder.mkdir(parents=True)
    arr = np.random.RandomState(0).randint(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / "a_plain.JPEG", format="JPEG", quality=90)
    Image.fromarray(arr).save(folder / "b_png_named.JPEG", format="PNG")       # as n02105855_2933.JPEG
    Image.fromarray(arr).convert("CMYK").save(folder / "c_cmyk.JPEG", format="JPEG")   # 22 of these in ImageNet
    Image.fromarray(arr).save(folder / "d_progressive.JPEG", format="JPEG", progressive=True)
    Image.fromarray(arr).convert("L").save(folder / "e_grey.JPEG", format="JPEG")
    return {"a_plain.JPEG": True, "b_png_named.JPEG": False, "c_cmyk.JPEG": False, "d_progressive.JPEG": True,
            "e_grey.JPEG": False}


def test_files_nvjpeg_should_not_get_are_decoded_by_the_workers_and_merged_in_order(tmp_path):
    expected = _odd_files(tmp_path)
    dataset = jpeg_bytes(build_dataset(str(tmp_path), "train", None, labelled=False))
    items = [dataset[i] for i in range(len(dataset))]
    assert {Path(name).name: encoded for _, _, encoded, name in items} == expected
    batch, labels = collate_bytes(items)
    assert batch.data.dim() == 1 and len(batch.offsets) == sum(expected.values()) + 1 and len(batch.decoded) == 3
    images = GpuPretrainAugment(32, torch.device("cpu")).decode(batch)
    for image, (_, _, _, name) in zip(images, items):
        reference = torch.from_numpy(np.asarray(load_rgb(name))).permute(2, 0, 1)
        assert image.shape == reference.shape == (3, 30, 40), name
        assert (image.float() - reference.float()).abs().mean() < 2.0, name   # libjpeg and PIL's: rounding
    with pytest.raises(UserError, match="give --data_path"):
        JpegBytes(build_dataset(None, "train", None))


def _truncated(folder):
    arr = np.random.RandomState(1).randint(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=90)
    (folder / "z_truncated.JPEG").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def test_a_truncated_jpeg_stops_naming_it_or_is_skipped(tmp_path):
    _odd_files(tmp_path)
    _truncated(tmp_path / "train" / "c")
    stop = jpeg_bytes(build_dataset(str(tmp_path), "train", None, labelled=False))
    assert not device_decodable((tmp_path / "train" / "c" / "z_truncated.JPEG").read_bytes())
    with pytest.raises(UserError, match="z_truncated.JPEG: unreadable image .*--bad_images skip"):
        stop[len(stop) - 1]
    skip = jpeg_bytes(build_dataset(str(tmp_path), "train", None, bad_images="skip", labelled=False))
    assert Path(skip[len(skip) - 1][3]).name == "a_plain.JPEG"   # the next readable image, as on the CPU path


def _refused_jpeg(seed: int) -> bytes:
    """A JPEG that passes every header check but whose Huffman table the decoder refuses."""
    raw = bytearray(_jpeg_bytes(np.random.RandomState(seed).randint(0, 255, (20, 28, 3), dtype=np.uint8)).numpy())
    table = raw.index(b"\xff\xc4")
    raw[table + 5:table + 21] = b"\xff" * 16
    return bytes(raw)


@pytest.mark.parametrize("skip", [False, True])
def test_a_batch_the_decoder_refuses_is_retried_image_by_image(skip, capsys):
    good = [_jpeg_bytes(np.full((20, 28, 3), value, dtype=np.uint8)) for value in (50, 200)]
    bad = _refused_jpeg(0)
    assert device_decodable(bad)
    batch = collate_bytes([(good[0], 0, True, "good0.jpg"), (torch.frombuffer(bytearray(bad), dtype=torch.uint8), 0,
                            True, "refused.jpg"), (good[1], 0, True, "good1.jpg")])[0]
    augment = GpuPretrainAugment(16, torch.device("cpu"), skip_bad_images=skip)
    if not skip:
        with pytest.raises(UserError, match="refused.jpg: the device's JPEG decoder cannot read it .*bad_images skip"):
            augment.decode(batch)
        return
    images = augment.decode(batch)
    assert len(images) == 3 and torch.equal(images[1], images[0]) and not torch.equal(images[2], images[0])


def test_a_batch_of_512_crosses_from_the_workers_under_a_low_descriptor_limit(tmp_path):
    """Each image was its own shared-memory segment and file descriptor: 512 raised EMFILE under
    ulimit -n 1024 with the loader's other descriptors; a batch is now a few tensors whatever its size."""
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(512):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i}.jpg", quality=90)
    script = f"""
import resource, sys, torch
sys.path.insert(0, {str(REPO)!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from util.data import build_dataset
from util.gpu_augment import collate_bytes, jpeg_bytes
dataset = jpeg_bytes(build_dataset({str(tmp_path)!r}, "train", None, labelled=False))
loader = torch.utils.data.DataLoader(dataset, batch_size=512, num_workers=1, collate_fn=collate_bytes)
batch, labels = next(iter(loader))
assert len(batch) == 512 and len(labels) == 512 and len(batch.offsets) == 513
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)   # a hang before
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-800:]


def test_pretraining_with_gpu_decode_on_imagenets_odd_files(tmp_path):
    _odd_files(tmp_path)
    _truncated(tmp_path / "train" / "c")
    common = ["--data_path", str(tmp_path), "--gpu_decode", "--epochs", "1", "--batch_size", "3",
              "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "0", "--input_size", "32"]
    stopped = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "stop"))
    assert stopped.returncode == 2 and "z_truncated.JPEG: unreadable image" in stopped.stderr
    skipped = run_script("main_pretrain.py", *common, "--bad_images", "skip", "--output_dir", str(tmp_path / "skip"))
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped: " in skipped.stdout + skipped.stderr and "z_truncated.JPEG" in skipped.stdout + skipped.stderr


@pytest.mark.slow
def test_pretraining_with_gpu_decode_runs_and_resumes_exactly(tmp_path):
    rng = np.random.RandomState(0)
    for c in range(2):
        d = tmp_path / "data" / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.randint(0, 255, (36 + i % 5, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    common = ["--data_path", str(tmp_path / "data"), "--gpu_decode", "--epochs", "2", "--batch_size", "4",
              "--num_workers", "1", "--print_freq", "1", "--warmup_epochs", "1"]
    straight = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    stopped = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"),
                         env={"HPM_FAULT": "point=step,at=4,action=SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr
    resumed = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"))
    assert resumed.returncode == 0 and "at epoch 0, step 4" in resumed.stdout, resumed.stderr
    from util.checkpoint import load_file
    a, b = load_file(tmp_path / "a" / "checkpoint-last.pth"), load_file(tmp_path / "b" / "checkpoint-last.pth")
    for part in ("model", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert math.isfinite(json_loss(tmp_path / "a"))


def json_loss(out) -> float:
    import json
    return json.loads((out / "log.txt").read_text().splitlines()[-1])["train_total"]


def test_cuda_decode_keeps_the_device_index_and_orders_the_streams(monkeypatch):
    """The CUDA branch of the decode, with CUDA's stream calls recorded (no GPU here): it decodes onto
    the run's own device (cuda:1 stays cuda:1), on its own stream made to wait for the training
    stream, and the training stream waits for the decode and is recorded on every image."""
    import torchvision

    from util.gpu_augment import decode_jpegs
    calls = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits for {other.name}")

    training, side = Stream("training"), Stream("decode")

    class Current:
        def __enter__(self):
            calls.append("decode stream current")

        def __exit__(self, *exc):
            calls.append("training stream current")

    def decode_jpeg(data, mode, device):
        calls.append(f"decode on {device}")
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: calls.append(f"current of {device}") or training)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: Current())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: calls.append(f"image used on {s.name}"))
    images = decode_jpegs([torch.zeros(8, dtype=torch.uint8)] * 2, torch.device("cuda", 1), side)
    assert len(images) == 2
    assert calls == ["current of cuda:1", "decode waits for training", "decode stream current", "decode on cuda:1",
                     "training stream current", "training waits for decode", "image used on training",
                     "image used on training"]


@pytest.mark.parametrize("pixels_per_group", [2**25, 3000])   # one group; a group per image or two
def test_batched_resized_crops_equal_torchvisions_per_image_resize(monkeypatch, pixels_per_group):
    """The batch's crops resized at once equal torchvision's antialiased bicubic resized_crop of each
    image on its own, rounded (all but rounding ties exactly), up- and downscaling: the float path,
    which is what torchvision runs for uint8 images on CUDA (its fixed-point uint8 kernels are the CPU's)."""
    from torchvision.transforms.v2 import functional as TF

    import util.gpu_augment as gpu_augment
    monkeypatch.setattr(gpu_augment, "PIXELS_PER_GROUP", pixels_per_group)
    rng = np.random.RandomState(0)
    sizes = [(60, 80), (90, 45), (24, 24), (200, 130), (31, 57)]
    images = [torch.from_numpy(np.clip(rng.normal(128, 60, (3, h, w)), 0, 255).astype(np.uint8)) for h, w in sizes]
    boxes = torch.tensor([[5, 7, 40, 50], [0, 0, 90, 45], [3, 2, 10, 20], [20, 10, 180, 100], [1, 30, 30, 27]])
    ours = gpu_augment.resized_crops(images, boxes, 32)
    for img, (top, left, h, w), mine in zip(images, boxes.tolist(), ours):
        resize = dict(interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        exact = TF.resized_crop(img.float(), top, left, h, w, [32, 32], **resize).round().clamp(0, 255)
        diff = (mine - exact).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999, (h, w)
