"""A synthetic JPEG ImageFolder (train/ and val/, one folder per class) for end-to-end and loader
checks: smooth random colour fields with noise, of random sizes, so that JPEG decoding and
resizing cost what they cost on photographs.

    python benchmarks/make_jpeg_folder.py --root /tmp/jpegs --train 4096 --val 512 --classes 10

`--odd_files` also writes ImageNet's kinds of awkward training files into class 0: a PNG named
.JPEG (as n02105855_2933.JPEG), a CMYK JPEG (ImageNet has 22), a progressive JPEG, a greyscale JPEG
and a truncated JPEG (which no decoder reads: `--bad_images skip` must pass over it).
"""
import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description="synthetic JPEG ImageFolder")
    p.add_argument("--root", required=True, help="folder to create (train/ and val/ inside)")
    p.add_argument("--train", type=int, default=4096, help="training images")
    p.add_argument("--val", type=int, default=512, help="validation images")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--min_size", type=int, default=256, help="smallest side length")
    p.add_argument("--max_size", type=int, default=320, help="largest side length")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--odd_files", action="store_true",
                   help="add a PNG named .JPEG, a CMYK, a progressive, a greyscale and a truncated JPEG to train/")
    args = p.parse_args()
    rng = np.random.RandomState(args.seed)
    for split, count in (("train", args.train), ("val", args.val)):
        for i in range(count):
            label = i % args.classes
            folder = Path(args.root) / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.randint(args.min_size, args.max_size + 1, 2)
            coarse = rng.uniform(0, 255, (4, 4, 3)) * 0.5 + 127 * (label / max(args.classes - 1, 1))
            field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
            pixels = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    if args.odd_files:
        write_odd_files(Path(args.root) / "train" / "class_000", rng, args.min_size)
    print(f"wrote {args.train} training and {args.val} validation JPEGs under {args.root}"
          + (" (and 5 odd files in train/class_000)" if args.odd_files else ""))


def write_odd_files(folder: Path, rng: np.random.RandomState, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rng.randint(0, 255, (size, size + 17, 3), dtype=np.uint8))
    image.save(folder / "odd_png_named.JPEG", format="PNG")
    image.convert("CMYK").save(folder / "odd_cmyk.JPEG", format="JPEG", quality=90)
    image.save(folder / "odd_progressive.JPEG", format="JPEG", quality=90, progressive=True)
    image.convert("L").save(folder / "odd_grey.JPEG", format="JPEG", quality=90)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    (folder / "odd_truncated.JPEG").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


if __name__ == "__main__":
    main()
