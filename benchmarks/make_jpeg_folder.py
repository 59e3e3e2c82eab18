"""A synthetic JPEG ImageFolder (train/ and val/, one folder per class) for end-to-end and loader
checks: smooth random colour fields with noise, of random sizes, so that JPEG decoding and
resizing cost what they cost on photographs.

    python benchmarks/make_jpeg_folder.py --root /tmp/jpegs --train 4096 --val 512 --classes 10
"""
import argparse
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
    print(f"wrote {args.train} training and {args.val} validation JPEGs under {args.root}")


if __name__ == "__main__":
    main()
