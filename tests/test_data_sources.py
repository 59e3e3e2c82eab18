"""The data people have: unlabelled (nested) image folders, list files without labels, WebDataset
shards and Hugging Face datasets, through the loaders and the real scripts."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from tests.helpers import REPO
from util.data import build_dataset, train_loader, with_transform
from util.distributed import DistInfo
from util.errors import UserError
from util.shards import ShardDataset, expand_braces, shard_files

SMALL = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
TINY = ["--batch_size", "4", "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "0", "--epochs", "1"]


def _jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (size, size + seed % 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_shards(folder, sizes, first_id=0, labelled=True, broken=None) -> list[int]:
    """Shards of the given sizes; sample i has key 'sample_i' and label i (its id); `broken`: an id
    whose image bytes are not a JPEG."""
    import webdataset
    folder.mkdir(parents=True, exist_ok=True)
    ids, next_id = [], first_id
    for number, size in enumerate(sizes):
        with webdataset.TarWriter(str(folder / f"part-{number:03d}.tar")) as sink:
            for _ in range(size):
                sample = {"__key__": f"sample_{next_id}", "jpg": b"broken" if next_id == broken else _jpeg(next_id)}
                if labelled:
                    sample["cls"] = str(next_id).encode()
                sink.write(sample)
                ids.append(next_id)
                next_id += 1
    return ids


def _epoch_ids(dataset, rank: int, world: int, epoch: int, batch: int = 3, workers: int = 2, skip: int = 0):
    loader = train_loader(dataset, DistInfo(rank, world), batch, workers, False, seed=7)
    loader.sampler.set_epoch(epoch, skip=skip)
    return [int(i) for _, labels in loader for i in labels]


# ---- WebDataset shards --------------------------------------------------------------------------

def test_brace_patterns_expand_like_webdatasets():
    assert expand_braces("s-{000..003}.tar") == [f"s-00{i}.tar" for i in range(4)]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar",
                                                     "b/x-9.tar", "b/x-10.tar"]


def test_uneven_shards_over_two_ranks_and_two_workers_see_every_sample_once_per_epoch(tmp_path):
    ids = _write_shards(tmp_path / "train", [7, 5, 9, 3])               # 24 samples, uneven shards
    dataset = with_transform(build_dataset(str(tmp_path), "train", None), SMALL)
    assert isinstance(dataset, ShardDataset) and len(dataset) == 24 and dataset.num_classes == 24
    orders = []
    for epoch in (0, 1):
        per_rank = [_epoch_ids(dataset, rank, 2, epoch) for rank in (0, 1)]
        assert sorted(per_rank[0] + per_rank[1]) == ids                  # each sample once, none dropped
        orders.append(per_rank)
    assert orders[0] != orders[1]                                       # reshuffled per epoch
    assert [_epoch_ids(dataset, rank, 2, 1) for rank in (0, 1)] == orders[1]    # reproducible per (seed, epoch)
    # mid-epoch: resuming after 2 batches of rank 0 gives exactly the rest of its epoch
    assert _epoch_ids(dataset, 0, 2, 1, skip=6) == orders[1][0][6:]


def test_a_remainder_is_left_out_and_said(tmp_path, capsys):
    from util.logger import setup_logging
    setup_logging(True)
    _write_shards(tmp_path / "train", [13, 12])                        # 25 = 2 ranks x batch 3 x 4 + 1
    dataset = with_transform(build_dataset(str(tmp_path / "train" / "part-{000..001}.tar"), "train", None),
                             SMALL)
    seen = _epoch_ids(dataset, 0, 2, 0) + _epoch_ids(dataset, 1, 2, 0)
    assert len(seen) == len(set(seen)) == 24
    assert "each epoch uses 24 of the 25 training images" in capsys.readouterr().out


def test_shard_sources_and_their_errors(tmp_path):
    _write_shards(tmp_path / "flat", [2, 2])
    assert len(shard_files(str(tmp_path / "flat"), "train")) == 2
    with pytest.raises(UserError, match="put the val shards in"):
        shard_files(str(tmp_path / "flat"), "val")
    with pytest.raises(UserError, match="names the train split only"):
        shard_files(str(tmp_path / "flat" / "part-{000..001}.tar"), "val")
    with pytest.raises(UserError, match="1 of 3 shard\\(s\\) missing, first .*part-002.tar"):
        shard_files(str(tmp_path / "flat" / "part-{000..002}.tar"), "train")
    _write_shards(tmp_path / "unlabelled", [3], labelled=False)
    assert build_dataset(str(tmp_path / "unlabelled"), "train", None, labelled=False).targets == [-1] * 3
    with pytest.raises(UserError, match="sample sample_0 has no .cls label, which this script needs"):
        build_dataset(str(tmp_path / "unlabelled"), "train", None)


def test_a_corrupt_member_stops_naming_shard_and_key_or_is_skipped(tmp_path):
    _write_shards(tmp_path / "train", [3, 3], broken=4)
    dataset = build_dataset(str(tmp_path), "train", SMALL)
    with pytest.raises(UserError, match=r"part-001.tar: sample sample_4: unreadable image"):
        dataset[4]
    skipping = build_dataset(str(tmp_path), "train", transforms.ToTensor(), bad_images="skip")
    assert skipping[4][1] == 5 and skipping.skipped == 1


# ---- Hugging Face datasets ----------------------------------------------------------------------

def _hf_images(n: int, first: int = 0) -> list[Image.Image]:
    return [Image.open(io.BytesIO(_jpeg(first + i))) for i in range(n)]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """The same small dataset saved with save_to_disk (train / validation) and as Parquet files in the
    Hub's layout; one copy without labels and with another image column name."""
    import datasets
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    splits = {name: datasets.Dataset.from_dict({"image": _hf_images(n, first), "label": [i % 3 for i in range(n)]},
                                               features=features)
              for name, n, first in (("train", 12, 0), ("validation", 6, 100))}
    datasets.DatasetDict(splits).save_to_disk(str(root / "saved"))
    for name, split in splits.items():
        (root / "parquet" / "data").mkdir(parents=True, exist_ok=True)
        split.to_parquet(str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    plain = datasets.Dataset.from_dict({"img": _hf_images(8)}, features=datasets.Features({"img": datasets.Image()}))
    datasets.DatasetDict({"train": plain, "validation": plain}).save_to_disk(str(root / "unlabelled"))
    return root


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_hf_dataset_splits_labels_and_exact_resume(hf_folders, layout):
    train = with_transform(build_dataset(f"hf:{hf_folders / layout}", "train", None), SMALL)
    val = build_dataset(f"hf:{hf_folders / layout}", "val", None)
    assert len(train) == 12 and len(val) == 6 and train.num_classes == 3 and val.split == "validation"
    assert train[0][0].shape[0] == 3 and train.targets[:4] == [0, 1, 2, 0]
    full = _epoch_ids(train, 0, 1, 3, batch=2)
    assert _epoch_ids(train, 0, 1, 3, batch=2, skip=4) == full[4:]
    assert _epoch_ids(train, 0, 1, 3, batch=2) == full


def test_hf_columns_and_missing_labels_are_one_line_errors(hf_folders, tmp_path):
    with pytest.raises(UserError, match="no image column 'image' \\(columns: img\\); pass --image_column"):
        build_dataset(f"hf:{hf_folders / 'unlabelled'}", "train", None)
    assert len(build_dataset(f"hf:{hf_folders / 'unlabelled'}", "train", None, labelled=False, image_column="img")) == 8
    with pytest.raises(UserError, match="no label column 'label' \\(columns: img\\), which this script needs"):
        build_dataset(f"hf:{hf_folders / 'unlabelled'}", "train", None, image_column="img")
    with pytest.raises(UserError, match="neither a save_to_disk folder nor Parquet files"):
        build_dataset(f"hf:{tmp_path}", "train", None)
    with pytest.raises(UserError, match="a single saved split, used as train"):
        build_dataset(f"hf:{hf_folders / 'saved' / 'train'}", "val", None)


# ---- folders and lists without labels ------------------------------------------------------------

def _nested_images(root) -> int:
    paths = ["a/b/c/one.png", "a/two.JPG", "three.webp", "d/e/four.jpeg"]
    for i, rel in enumerate(paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(_jpeg(i, 40))).save(root / rel)
    (root / "a" / "notes.txt").write_text("not an image")
    return len(paths)


def test_unlabelled_nested_folder_and_list_file_without_labels(tmp_path):
    count = _nested_images(tmp_path / "mine")
    tree = build_dataset(str(tmp_path / "mine"), "train", None, labelled=False)
    assert len(tree) == count and tree.targets == [-1] * count
    assert [p.split("mine/")[1] for p, _ in tree.samples] == ["three.webp", "a/two.JPG", "a/b/c/one.png",
                                                              "d/e/four.jpeg"]
    with pytest.raises(UserError, match="found neither train/ nor train.txt"):
        build_dataset(str(tmp_path / "mine"), "train", None)
    (tmp_path / "mine" / "train.txt").write_text("a/two.JPG\nthree.webp 3\n")
    listed = build_dataset(str(tmp_path / "mine"), "train", None, labelled=False)
    assert listed.targets == [-1, 3]
    with pytest.raises(UserError, match="train.txt:1: expected 'relative/path label'.*this script needs labels"):
        build_dataset(str(tmp_path / "mine"), "train", None)


# ---- every source through the scripts -----------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory, hf_folders):
    root = tmp_path_factory.mktemp("sources")
    _write_shards(root / "shards" / "train", [5, 3, 4], first_id=0)
    _write_shards(root / "shards" / "val", [3, 3], first_id=0)
    _nested_images(root / "unlabelled" / "train" / "deep")
    (root / "unlabelled" / "val").mkdir()
    Image.open(io.BytesIO(_jpeg(0, 40))).save(root / "unlabelled" / "val" / "loose.png")   # no class folders
    return {"shards": str(root / "shards"),
            "shard_pattern": str(root / "shards" / "{split}" / "part-{000..001}.tar"),
            "hf": f"hf:{hf_folders / 'saved'}", "parquet": f"hf:{hf_folders / 'parquet'}",
            "unlabelled": str(root / "unlabelled")}


@pytest.mark.parametrize("source", ["shards", "shard_pattern", "hf", "parquet", "unlabelled"])
@pytest.mark.parametrize("extra", [[], ["--norm", "dataset", "--bad_images", "skip"]], ids=["plain", "norm_skip"])
def test_pretraining_on_each_source(sources, tmp_path, source, extra):
    out = tmp_path / "out"
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        ["--data_path", sources[source], "--output_dir", str(out), *TINY, *extra]))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and np.isfinite(record["train_total"])


def test_gpu_decode_reads_shards_and_hf_images(sources, tmp_path):
    for source in ("shards", "hf"):
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            ["--data_path", sources[source], "--output_dir", str(tmp_path / source), *TINY, "--gpu_decode"]))
        assert (tmp_path / source / "checkpoint-last.pth").is_file()


@pytest.fixture(scope="module")
def weights(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        ["--data_path", sources["shards"], "--output_dir", str(out), *TINY, "--norm", "dataset"]))
    return str(out / "checkpoint-last.pth")


@pytest.mark.parametrize("source", ["shards", "hf", "parquet"])
def test_finetuning_probing_and_knn_on_each_labelled_source(sources, weights, tmp_path, source):
    common = ["--data_path", sources[source], "--finetune", weights, "--batch_size", "4", "--num_workers", "0"]
    train = [*common, "--epochs", "1", "--warmup_epochs", "0", "--print_freq", "1"]
    main_finetune.main(main_finetune.get_args_parser().parse_args([*train, "--output_dir", str(tmp_path / "ft")]))
    main_linprobe.main(main_linprobe.get_args_parser().parse_args([*train, "--output_dir", str(tmp_path / "lp")]))
    main_knn.main(main_knn.get_args_parser().parse_args([*common, "--nb_knn", "2", "--output_dir", str(tmp_path)]))
    ft = json.loads((tmp_path / "ft" / "log.txt").read_text().splitlines()[-1])
    assert ft["test_count"] == (6 if source == "shards" else 6)
    knn = json.loads((tmp_path / "log_knn.txt").read_text().splitlines()[-1])
    assert 0 <= knn["k2_acc1"] <= 100


def test_labelled_scripts_refuse_unlabelled_sources_in_one_line(sources, weights, tmp_path):
    for data_path, words in ((sources["unlabelled"], "this script needs labels"),
                             (f"{sources['hf'].removesuffix('saved')}unlabelled", "no image column 'image'")):
        res = subprocess.run([sys.executable, str(REPO / "main_finetune.py"), "--data_path", data_path,
                              "--finetune", weights, "--output_dir", str(tmp_path / "x"), *TINY],
                             capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 2 and words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_visualize_takes_a_dataset_as_images(sources, weights, tmp_path):
    import visualize
    for source in ("shards", "hf"):
        out = tmp_path / f"{source}.png"
        visualize.main(visualize.get_args_parser().parse_args(
            ["--checkpoint", weights, "--images", sources[source], "--output", str(out), "--num_images", "2"]))
        assert Image.open(out).size[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "hf"])
def test_torchrun_pretraining_on_shards_and_hf(sources, tmp_path, source):
    """2 gloo ranks: the source's samples split across them, the run resumable as any other."""
    import os
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_pretrain.py",
           "--data_path", sources[source], "--output_dir", str(out), *TINY, "--batch_size", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 process(es)" in res.stdout and json.loads((out / "log.txt").read_text())["epoch"] == 0


def test_column_flags_through_the_scripts(hf_folders, tmp_path):
    """--image_column for an unlabelled dataset's pretraining; --label_column names the labels."""
    import datasets
    out = tmp_path / "pre"
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        ["--data_path", f"hf:{hf_folders / 'unlabelled'}", "--image_column", "img", "--output_dir", str(out), *TINY]))
    assert (out / "checkpoint-last.pth").is_file()
    renamed = datasets.load_from_disk(str(hf_folders / "saved"))
    renamed = datasets.DatasetDict({k: v.rename_columns({"image": "picture", "label": "fine_label"})
                                    for k, v in renamed.items()})
    renamed.save_to_disk(str(tmp_path / "renamed"))
    argv = ["--data_path", f"hf:{tmp_path / 'renamed'}", "--image_column", "picture", "--label_column", "fine_label",
            "--finetune", str(out / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "ft"), *TINY]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    assert json.loads((tmp_path / "ft" / "log.txt").read_text())["test_count"] == 6


def test_make_shards_turns_an_image_folder_into_shards_that_train(tmp_path):
    from tests.helpers import make_image_folder, run_script
    make_image_folder(tmp_path / "folder", classes=2, per_class=5, size=32)
    make_image_folder(tmp_path / "folder", classes=2, per_class=2, size=32, split="val")
    res = run_script("benchmarks/make_shards.py", "--data_path", str(tmp_path / "folder"), "--output",
                     str(tmp_path / "shards"), "--per_shard", "4")
    assert res.returncode == 0, res.stderr
    assert "train: 10 samples in 3 shard(s)" in res.stdout and "val: 4 samples in 1 shard(s)" in res.stdout
    train = build_dataset(str(tmp_path / "shards"), "train", None)
    assert len(train) == 10 and sorted(train.targets) == [0] * 5 + [1] * 5 and train.targets != sorted(train.targets)
    assert len(build_dataset(str(tmp_path / "shards" / "{split}" / "{split}-000000.tar"), "val", None)) == 4
