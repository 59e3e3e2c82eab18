"""Shared test helpers: run the real scripts, make small image trees and real video files."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch_size", "16", "--num_workers", "0", "--print_freq", "5"]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def make_image_folder(root: Path, classes: int = 2, per_class: int = 12, size: int = 36, split: str = "train",
                      modes: tuple[str, ...] = ("RGB",)) -> list[str]:
    """ImageFolder tree root/split/class_k/img_i.png with images in the given PIL modes."""
    rng = np.random.RandomState(0)
    rel = []
    for c in range(classes):
        d = root / split / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode = modes[i % len(modes)]
            arr = rng.randint(0, 255, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if mode == "I;16":
                img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
                ext = ".png"
            elif mode == "CMYK":
                img, ext = img.convert("CMYK"), ".jpg"
            else:
                img, ext = img.convert(mode), ".png"
            path = d / f"img_{i}{ext}"
            img.save(path)
            rel.append((f"class_{c}/{path.name}", c))
    (root / f"{split}.list").write_text("".join(f"{p} {c}\n" for p, c in rel))
    return [p for p, _ in rel]


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def unchanged(directory: Path, before: dict) -> bool:
    """Every file that existed before is still there with the same bytes (new files may appear)."""
    return all((directory / name).is_file() and (directory / name).read_bytes() == data
               for name, data in before.items())


def write_video(path, frames: int, height: int, width: int, grey: bool = False, codec: str = "mpeg4") -> None:
    """A real video file: a bright square moving right over noise, `frames` frames at 25 fps."""
    import av
    rng = np.random.RandomState(frames + height)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec if not grey else "ffv1", rate=25)
        stream.width, stream.height = width, height
        stream.pix_fmt = "gray" if grey else "yuv420p"
        for t in range(frames):
            pixels = rng.randint(0, 60, (height, width, 3), dtype=np.uint8)
            pixels[height // 3: height // 3 + 6, (2 * t) % max(width - 6, 1):][:, :6] = 250
            frame = av.VideoFrame.from_ndarray(pixels[..., 0] if grey else pixels, format="gray" if grey else "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
