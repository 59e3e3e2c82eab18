"""Hugging Face datasets as image datasets (`--data_path hf:DIR`), local and memory-mapped.

DIR is a folder written by `save_to_disk` (a DatasetDict or a single Dataset) or holding Parquet
files: DIR/<split>/*.parquet, or files named <split>-*.parquet anywhere below DIR (the Hub's
layout, e.g. data/train-00000-of-00294.parquet). Parquet is converted once to Arrow in the datasets
cache; nothing is downloaded (HF_DATASETS_OFFLINE is set). Splits: `train`, and for validation
`validation`, `val` or `test`, the first that exists. Images are decoded here (the column is read
as bytes), so an unreadable one stops the run naming its row, or is skipped with --bad_images skip.
"""
import io
import os
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from util.errors import UserError

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "test")}


def _load(root: Path, split: str):
    """The split as a datasets.Dataset, and the name it has there."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UserError("--data_path hf:... needs the datasets package: pip install datasets") from None
    names = SPLIT_NAMES.get(split, (split,))
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.Dataset):
            if split != "train":
                raise UserError(f"--data_path hf:{root}: a single saved split, used as train; save a DatasetDict "
                                f"with a {' or '.join(names)} split")
            return loaded, "train"
        found = next((n for n in names if n in loaded), None)
        if found is None:
            raise UserError(f"--data_path hf:{root}: no {' or '.join(names)} split (it has {', '.join(loaded)})")
        return loaded[found], found
    for name in names:
        files = sorted(str(p) for p in (root / name).glob("*.parquet")) if (root / name).is_dir() else []
        files = files or sorted(str(p) for p in root.rglob(f"{name}-*.parquet"))
        if files:
            return datasets.Dataset.from_parquet(files), name
    raise UserError(f"--data_path hf:{root}: neither a save_to_disk folder nor Parquet files of the "
                    f"{' or '.join(names)} split (<split>/*.parquet or <split>-*.parquet)")


class HFImageDataset(Dataset):
    """One split of a local Hugging Face dataset: (image, label) with the image decoded here."""

    def __init__(self, root: str, split: str, transform: Callable | None = None, image_column: str = "image",
                 label_column: str = "label", labelled: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"--data_path hf:{root}: no such folder")
        data, self.split = _load(self.root, split)   # says in one line when datasets is not installed
        import datasets
        where = f"--data_path hf:{root} ({self.split} split)"
        if image_column not in data.column_names:
            raise UserError(f"{where}: no image column {image_column!r} (columns: {', '.join(data.column_names)}); "
                            f"pass --image_column")
        has_labels = label_column in data.column_names
        if labelled and not has_labels:
            raise UserError(f"{where}: no label column {label_column!r} (columns: {', '.join(data.column_names)}), "
                            f"which this script needs; pass --label_column")
        columns = [image_column] + ([label_column] if has_labels else [])
        self.data = data.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column = image_column, label_column if has_labels else None
        self.targets = list(self.data[label_column]) if has_labels else [-1] * len(self.data)
        feature = data.features.get(label_column) if has_labels else None
        self.num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else max(self.targets) + 1
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def name(self, index: int) -> str:
        return f"hf:{self.root} ({self.split} split): row {index}"

    def raw_sample(self, index: int) -> tuple[bytes, int]:
        row = self.data[index]
        image = row[self.image_column]
        data = image["bytes"] if image.get("bytes") is not None else Path(image["path"]).read_bytes()
        return data, self.targets[index]

    def __getitem__(self, index: int):
        from util.data import load_rgb
        data, label = self.raw_sample(index)
        img = load_rgb(io.BytesIO(data), self.name(index))
        return (self.transform(img) if self.transform else img), label
