"""Turn an ImageFolder (or a list file, or any image folder) into WebDataset tar shards, with
webdataset's ShardWriter: KEY.jpg (the file's bytes, unchanged) and KEY.cls (the label, when there
is one), the samples shuffled once (seeded), so that no shard holds a single class.

    python benchmarks/make_shards.py --data_path /data/imagenet --output /data/imagenet_shards
    # -> /data/imagenet_shards/train/train-000000.tar ... and val/val-000000.tar ...
    python main_pretrain.py --data_path /data/imagenet_shards ...

Pretraining reads the folder or a pattern ('/data/imagenet_shards/{split}/{split}-{000000..000127}.tar').
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.data import build_dataset  # noqa: E402
from util.errors import optional_import, run_cli  # noqa: E402


def write_split(data_path: str, split: str, output: Path, per_shard: int, seed: int, labelled: bool) -> int:
    webdataset = optional_import("webdataset", "webdataset", "benchmarks/make_shards.py")
    dataset = build_dataset(data_path, split, None, labelled=labelled)
    samples = list(dataset.samples)
    random.Random(seed).shuffle(samples)
    (output / split).mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(output / split / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for number, (path, label) in enumerate(samples):
            sample = {"__key__": f"{number:08d}", Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg"):
                      Path(path).read_bytes()}
            if label >= 0:
                sample["cls"] = str(label).encode()
            sink.write(sample)
    return len(samples)


def main() -> None:
    p = argparse.ArgumentParser(description="ImageFolder to WebDataset shards")
    p.add_argument("--data_path", required=True, help="DIR with train/ (and val/) as main_pretrain.py reads it")
    p.add_argument("--output", required=True, help="folder for train/ and val/ shards")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert (those that exist)")
    p.add_argument("--per_shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    p.add_argument("--unlabelled", action="store_true", help="any images, no labels (pretraining only)")
    args = p.parse_args()
    for split in args.splits:
        if split != "train" and not (Path(args.data_path) / split).exists() \
                and not (Path(args.data_path) / f"{split}.txt").exists():
            continue
        count = write_split(args.data_path, split, Path(args.output), args.per_shard, args.seed, not args.unlabelled)
        print(f"{split}: {count} samples in {-(-count // args.per_shard)} shard(s) under {args.output}/{split}")


if __name__ == "__main__":
    run_cli(main)
