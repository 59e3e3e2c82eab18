"""WebDataset tar shards as a map-style dataset: one index of the shards' members, read by offset.

A sample is the members of a shard that share a key, WebDataset's convention: `KEY.jpg` (or
`.jpeg`, `.png`, `.webp`) and, optionally, `KEY.cls` (the label as text). The shards are indexed
once at the start (tar headers only, plus the tiny `.cls` members), then every image is read with
one positional read from a file opened once per process. Being map-style, shards go through the
same sampler as image folders: a permutation per (seed, epoch) split across ranks and workers, each
sample once an epoch, exact mid-epoch resumption (util/data.py). WebDataset's own readers stream
the tars, which can give neither; it writes the shards (`benchmarks/make_shards.py`).
"""
import glob
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, NamedTuple

from torch.utils.data import Dataset

from util.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardSample(NamedTuple):
    shard: int      # index into ShardDataset.shards
    key: str
    offset: int     # of the image member's data in the shard file
    size: int
    label: int      # -1 without a .cls member


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: 'train-{000..012}.tar' (zero-padded ranges) and '{a,b}' lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [path for item in items for path in expand_braces(head + item + tail)]


def shard_files(data_path: str, split: str) -> list[Path] | None:
    """The shards of `split`, or None when `data_path` does not name shards. A brace pattern or a
    single .tar (with `{split}` standing for the split's name, else the train split only), a folder
    of .tar files (the train split), or a folder with <split>/*.tar."""
    if data_path.startswith("hf:"):
        return None
    if "{" in data_path or data_path.endswith(".tar"):
        if "{split}" not in data_path and split != "train":
            raise UserError(f"--data_path {data_path}: a shard pattern without {{split}} names the train split only; "
                            f"write the split as {{split}} (e.g. shards/{{split}}-{{000..099}}.tar) or use a folder "
                            f"with train/ and val/ shards")
        paths = [Path(p) for p in expand_braces(data_path.replace("{split}", split))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"--data_path {data_path}: {len(missing)} of {len(paths)} shard(s) missing, first "
                            f"{missing[0]}; fix the pattern")
        return paths
    root = Path(data_path)
    if not root.is_dir():
        return None
    if (root / split).is_dir() and glob.glob(str(root / split / "*.tar")):
        return sorted((root / split).glob("*.tar"))
    direct = sorted(root.glob("*.tar"))
    if direct:
        if split != "train":
            raise UserError(f"--data_path {root}: its .tar shards are the train split; put the {split} shards in "
                            f"{root}/{split}/")
        return direct
    if split != "train" and (root / "train").is_dir() and glob.glob(str(root / "train" / "*.tar")):
        raise UserError(f"--data_path {root}: no {split} shards ({root}/{split}/*.tar)")
    return None


def index_shard(path: Path, number: int) -> list[ShardSample]:
    """The samples of one shard, in member order; a key without an image is an error naming it."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                if "." not in name:
                    continue
                stem, ext = name.split(".", 1)
                groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = member
            labels = {key: tar.extractfile(members["cls"]).read() for key, members in groups.items()
                      if "cls" in members}
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{path}: not a readable tar shard ({exc}); re-create it (benchmarks/make_shards.py)") from None
    samples = []
    for key, members in groups.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise UserError(f"{path}: sample {key} has no image ({', '.join(sorted(members))}; expected one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        label = -1
        if key in labels:
            try:
                label = int(labels[key].decode().strip())
            except ValueError:
                raise UserError(f"{path}: sample {key}: its .cls is not an integer label") from None
        samples.append(ShardSample(number, key, image.offset_data, image.size, label))
    return samples


class ShardDataset(Dataset):
    """Every sample of a list of shards, in shard order, then member order."""

    def __init__(self, shards: list[Path], transform: Callable | None = None, labelled: bool = False) -> None:
        self.shards = [str(p) for p in shards]
        self.samples_index: list[ShardSample] = []
        for number, path in enumerate(shards):
            self.samples_index += index_shard(path, number)
        if not self.samples_index:
            raise UserError(f"shards {self.shards[0]} ...: no samples in {len(shards)} shard(s)")
        self.targets = [s.label for s in self.samples_index]
        unlabelled = next((s for s in self.samples_index if s.label < 0), None)
        if labelled and unlabelled is not None:
            raise UserError(f"{self.shards[unlabelled.shard]}: sample {unlabelled.key} has no .cls label, which "
                            f"this script needs; label every sample (KEY.cls), or pretrain on them")
        self.num_classes = max(self.targets) + 1
        self.transform = transform
        self._files: dict[int, dict[int, int]] = {}   # pid -> shard -> file descriptor

    def __len__(self) -> int:
        return len(self.samples_index)

    def name(self, index: int) -> str:
        sample = self.samples_index[index]
        return f"{self.shards[sample.shard]}: sample {sample.key}"

    def raw_sample(self, index: int) -> tuple[bytes, int]:
        """The image member's bytes (one positional read) and the label."""
        sample = self.samples_index[index]
        files = self._files.setdefault(os.getpid(), {})   # descriptors are not shared across fork()
        if sample.shard not in files:
            files[sample.shard] = os.open(self.shards[sample.shard], os.O_RDONLY)
        return os.pread(files[sample.shard], sample.size, sample.offset), sample.label

    def __getitem__(self, index: int):
        from util.data import load_rgb
        data, label = self.raw_sample(index)
        img = load_rgb(io.BytesIO(data), self.name(index))
        return (self.transform(img) if self.transform else img), label

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}
