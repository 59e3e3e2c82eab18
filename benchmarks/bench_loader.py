"""Images per second of the pretraining loader alone (decode, RandomResizedCrop, flip, normalise,
collate), for each worker count and each data source, on the same images: whether the loader can
feed the training step, and how many CPU cores a GPU needs.

    python benchmarks/make_jpeg_folder.py --root /tmp/jpegs --train 2048 --val 0 --min_size 400 --max_size 500
    python benchmarks/bench_loader.py --data_path /tmp/jpegs --workers 1 2 --sources reference folder shards hf

Sources: `folder` (this project's ImageFolder path), `shards` (the same JPEGs written as WebDataset
shards first), `hf` (the same JPEGs as a Hugging Face dataset on disk), and `reference` (the
reference's pipeline: torchvision's ImageFolder and default PIL loader, RandomResizedCrop, flip,
a shuffled DataLoader). With --gpu_decode the workers only read the bytes and the batch is decoded
and augmented on --device, as `main_pretrain.py --gpu_decode` does.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.data import build_dataset, pretrain_transform, train_loader  # noqa: E402
from util.distributed import DistInfo, resolve_device  # noqa: E402
from util.gpu_augment import GpuPretrainAugment, collate_bytes, jpeg_bytes  # noqa: E402

GOAL_IMAGES_PER_S = 2600   # a ViT-B/16 HPM step on one H200 at the GPU goal (BENCHMARKS.md)


def make_source(source: str, folder: str, scratch: Path) -> str:
    """The --data_path of `source`, made from the JPEG folder when needed."""
    if source in ("folder", "reference"):
        return folder
    if source == "shards":
        from make_shards import write_split
        write_split(folder, "train", scratch / "shards", per_shard=256, seed=0, labelled=True)
        return str(scratch / "shards")
    import datasets as hf
    tree = build_dataset(folder, "train", None)
    rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in tree.samples],
            "label": [label for _, label in tree.samples]}
    split = hf.Dataset.from_dict(rows, features=hf.Features({"image": hf.Image(), "label": hf.Value("int64")}))
    hf.DatasetDict({"train": split}).save_to_disk(str(scratch / "hf"))
    return f"hf:{scratch / 'hf'}"


def reference_loader(data_path: str, args, workers: int) -> torch.utils.data.DataLoader:
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = datasets.ImageFolder(str(Path(data_path) / "train"), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def images_per_second(args: argparse.Namespace, source: str, data_path: str, workers: int,
                      device: torch.device) -> float:
    augment = GpuPretrainAugment(args.input_size, device) if args.gpu_decode else None
    if source == "reference":
        loader = reference_loader(data_path, args, workers)
    else:
        dataset = build_dataset(data_path, "train", pretrain_transform(args.input_size), bad_images="skip",
                                labelled=False)   # a truncated file in the data (make_jpeg_folder.py --odd_files)
        loader = train_loader(jpeg_bytes(dataset) if augment else dataset, DistInfo(), args.batch_size, workers,
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
        raise SystemExit(f"--data_path {data_path}: too few images for {args.warmup} warm-up and "
                         f"{args.batches} timed batches of {args.batch_size}")
    return seen / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description="pretraining loader benchmark")
    p.add_argument("--data_path", required=True, help="JPEG ImageFolder root with train/")
    p.add_argument("--sources", nargs="+", default=["folder"], choices=["folder", "shards", "hf", "reference"],
                   help="data sources to time, each made from the same JPEGs")
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
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources:
            data_path = make_source(source, args.data_path, Path(scratch))
            rates = {str(w): images_per_second(args, source, data_path, w, device) for w in args.workers}
            per_worker = max(rate / max(int(w), 1) for w, rate in rates.items())
            results[source] = {"images_per_s": rates, "images_per_s_per_worker": per_worker,
                               "workers_for_goal": GOAL_IMAGES_PER_S / per_worker}
            print(f"{source}: " + ", ".join(f"{w} workers {r:.0f} images/s" for w, r in rates.items())
                  + f"; {per_worker:.0f} images/s per worker, {GOAL_IMAGES_PER_S / per_worker:.0f} workers for "
                    f"{GOAL_IMAGES_PER_S} images/s", flush=True)
    result = {"gpu_decode": args.gpu_decode, "batch_size": args.batch_size, "input_size": args.input_size,
              "images_per_s": results[args.sources[0]]["images_per_s"], "sources": results}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
