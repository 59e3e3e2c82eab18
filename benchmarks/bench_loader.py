"""Images per second of the pretraining loader alone (decode, RandomResizedCrop, flip, normalise,
collate), for each worker count: whether the loader can feed the training step.

    python benchmarks/bench_loader.py --data_path /tmp/jpegs --workers 8 16 --json loader.json

With --gpu_decode the workers only read the files' bytes and the batch is decoded and augmented on
--device, as `main_pretrain.py --gpu_decode` does.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.data import build_dataset, pretrain_transform, train_loader  # noqa: E402
from util.distributed import DistInfo, resolve_device  # noqa: E402
from util.gpu_augment import GpuPretrainAugment, JpegBytes, collate_bytes  # noqa: E402


def images_per_second(args: argparse.Namespace, workers: int, device: torch.device) -> float:
    dataset = build_dataset(args.data_path, "train", pretrain_transform(args.input_size))
    augment = GpuPretrainAugment(args.input_size, device) if args.gpu_decode else None
    loader = train_loader(JpegBytes(dataset) if augment else dataset, DistInfo(), args.batch_size, workers,
                          device.type == "cuda" and augment is None, 0, collate_bytes if augment else None)
    loader.sampler.set_epoch(0)
    seen, started = 0, None
    for i, (imgs, _) in enumerate(loader):
        if augment is not None:
            imgs = augment(augment.decode(imgs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i == args.warmup:
            started, seen = time.perf_counter(), 0
        seen += len(imgs)
        if i + 1 >= args.warmup + args.batches:
            break
    if started is None or seen == 0:
        raise SystemExit(f"--data_path {args.data_path}: too few images for {args.warmup} warm-up and "
                         f"{args.batches} timed batches of {args.batch_size}")
    return seen / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description="pretraining loader benchmark")
    p.add_argument("--data_path", required=True, help="ImageFolder root with train/")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16], help="worker counts to time")
    p.add_argument("--batch_size", type=int, default=256, help="images per batch")
    p.add_argument("--batches", type=int, default=10, help="timed batches")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (workers starting)")
    p.add_argument("--input_size", type=int, default=224, help="crop size")
    p.add_argument("--gpu_decode", action="store_true", help="decode and augment on --device")
    p.add_argument("--device", default="auto", help="device of the --gpu_decode path")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    device = resolve_device(args.device)
    result = {"gpu_decode": args.gpu_decode, "batch_size": args.batch_size, "input_size": args.input_size,
              "images_per_s": {str(w): images_per_second(args, w, device) for w in args.workers}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
