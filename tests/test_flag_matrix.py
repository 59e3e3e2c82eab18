"""Every flag that changes what is computed, alone and in the pairs that interact, through the real
scripts' `main` (in process): one tiny epoch each, tensorboard on.

Pretraining cells start at epoch 1 of 2 (`--start_epoch 1`), where HPM's alpha is above 0, so the
teacher chooses hard patches in every HPM cell; each cell must log finite losses, save its
checkpoint with the flags in it, and draw the epoch's tensorboard picture.
"""
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from util.checkpoint import load_file

STATS = ["--mean", "0.4", "0.45", "0.5", "--std", "0.2", "0.25", "0.3"]

# name -> flags; pairs are the flags that meet in the same code (picture, targets, masks, schedules)
PRETRAIN_CELLS = {
    "hpm": [],
    "mae": ["--no-learning_loss"],
    "absolute": ["--no-relative"],
    "norm_pix": ["--norm_pix_loss"],
    "norm_pix+mae": ["--norm_pix_loss", "--no-learning_loss"],
    "norm_pix+absolute": ["--norm_pix_loss", "--no-relative"],
    "norm_pix+norm_dataset": ["--norm_pix_loss", "--norm", "dataset"],
    "norm_pix+input_size": ["--norm_pix_loss", "--input_size", "48"],
    "norm_pix+vis_mask": ["--norm_pix_loss", "--vis_mask_ratio", "0.25"],
    "mask_ratio": ["--mask_ratio", "0.6"],
    "mask_ratio+mae": ["--mask_ratio", "0.6", "--no-learning_loss"],
    "mask_regular": ["--no-learning_loss", "--mask_regular"],
    "mask_block": ["--no-learning_loss", "--mask_block"],
    "mask_regular+input_size": ["--no-learning_loss", "--mask_regular", "--input_size", "48"],
    "mask_block+input_size": ["--no-learning_loss", "--mask_block", "--input_size", "48"],
    "mask_block+mask_ratio": ["--no-learning_loss", "--mask_block", "--mask_ratio", "0.6"],
    "vis_mask": ["--vis_mask_ratio", "0.25"],
    "vis_mask+mae": ["--vis_mask_ratio", "0.25", "--no-learning_loss"],
    "vis_mask+mask_regular": ["--vis_mask_ratio", "0.25", "--no-learning_loss", "--mask_regular"],
    "target_ema": ["--target", "ema"],
    "target_ema+mae": ["--target", "ema", "--no-learning_loss"],
    "target_ema+norm_pix": ["--target", "ema", "--norm_pix_loss"],
    "target_ema+step": ["--target", "ema", "--teacher_decay_unit", "step"],
    "target_ema+vis_mask": ["--target", "ema", "--vis_mask_ratio", "0.25"],
    "target_clip": ["--target", "clip"],
    "target_dino+mae": ["--target", "dino", "--no-learning_loss"],
    "step": ["--teacher_decay_unit", "step"],
    "step+half_life": ["--teacher_decay_unit", "step", "--teacher_half_life", "2"],
    "step+accum_iter": ["--teacher_decay_unit", "step", "--accum_iter", "2"],
    "step+absolute": ["--teacher_decay_unit", "step", "--no-relative"],
    "accum_iter": ["--accum_iter", "2"],
    "accum_iter+mae": ["--accum_iter", "2", "--no-learning_loss"],
    "input_size": ["--input_size", "48"],
    "norm_dataset": ["--norm", "dataset"],
    "norm_dataset+mae": ["--norm", "dataset", "--no-learning_loss"],
    "mean_std": STATS,
    "amp_bf16": ["--amp", "bf16"],
    "amp_fp16+mae": ["--amp", "fp16", "--no-learning_loss"],
    "amp_none": ["--amp", "none"],
    "no_clip_grad": ["--clip_grad", "0"],
    "gpu_decode": ["--gpu_decode"],
    "gpu_decode+norm_dataset": ["--gpu_decode", "--norm", "dataset"],
    "gpu_decode+norm_pix+mae": ["--gpu_decode", "--norm_pix_loss", "--no-learning_loss"],
    "bad_images_skip": ["--bad_images", "skip"],
    "gpu_decode+bad_images_skip": ["--gpu_decode", "--bad_images", "skip"],
    "deterministic": ["--deterministic"],
    "deterministic+accum_iter": ["--deterministic", "--accum_iter", "2"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 training and 8 validation JPEGs in 2 classes (JPEG so that --gpu_decode reads them too), a
    copy with one unreadable file, and frozen CLIP/DINO-like target files."""
    root = tmp_path_factory.mktemp("matrix")
    for split, per_class in (("train", 8), ("val", 4)):
        rng = np.random.RandomState(len(split))
        for c in range(2):
            folder = root / "images" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.randint(0, 255, (36, 36, 3), dtype=np.uint8)
                pixels[:, : 18 if c else 0] //= 4            # a class the features can see
                Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=90)
    bad = root / "with_bad"
    for split in ("train", "val"):
        for path in (root / "images" / split).rglob("*.jpg"):
            target = bad / path.relative_to(root / "images")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (bad / "train" / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=1)
    torch.save(timm.create_model("vit_base_patch16_224", num_classes=0, **kw).state_dict(), root / "dino.pth")
    torch.save(timm.create_model("vit_base_patch16_clip_224", num_classes=24, **kw).state_dict(), root / "clip.pth")
    return root


def _events(directory):
    return EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0}).Reload()


def _pretrain(data, out, flags):
    data_path = data / ("with_bad" if "--bad_images" in flags else "images")
    target = {"clip": ["--target_checkpoint", str(data / "clip.pth")],
              "dino": ["--target_checkpoint", str(data / "dino.pth")]}
    extra = next((v for k, v in target.items() if k in flags), [])
    argv = ["--data_path", str(data_path), "--output_dir", str(out), "--epochs", "2", "--start_epoch", "1",
            "--batch_size", "8", "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "1",
            *flags, *extra]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("flags", PRETRAIN_CELLS.values(), ids=PRETRAIN_CELLS.keys())
def test_pretraining_cell(data, tmp_path, flags):
    out = tmp_path / "out"
    _pretrain(data, out, flags)
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 1
    assert all(math.isfinite(record[k]) for k in ("train_total", "train_recon"))
    assert ("train_loss_pred" in record) == ("--no-learning_loss" not in flags)
    if "--no-learning_loss" not in flags:
        assert record["train_alpha"] > 0     # the teacher chose hard patches
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["next_epoch"] == 2
    parser = main_pretrain.get_args_parser()
    for flag in (f for f in flags if f.startswith("--")):
        dest = flag[2:].removeprefix("no-")
        assert ckpt["args"][dest] != parser.get_default(dest), f"{flag} not in effect"
    events = _events(out)
    assert len(events.Images("reconstruction")) == 1, "the epoch's picture is missing"
    assert {"train/recon", "train/total", "train/lr"} <= set(events.Tags()["scalars"])


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A tiny HPM pretraining checkpoint (2 epochs, so the teacher is in it) for the downstream cells."""
    out = tmp_path_factory.mktemp("matrix_pretrain")
    argv = ["--data_path", str(data / "images"), "--output_dir", str(out), "--epochs", "2", "--batch_size", "8",
            "--num_workers", "0", "--warmup_epochs", "1"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    return out / "checkpoint-last.pth"


def _common(data, out, checkpoint, flags, training=True):
    data_path = data / ("with_bad" if "--bad_images" in flags else "images")
    argv = ["--data_path", str(data_path), "--output_dir", str(out), "--finetune", str(checkpoint),
            "--batch_size", "8", "--num_workers", "0"]
    if training:
        argv += ["--epochs", "1", "--print_freq", "1", "--warmup_epochs", "0"]
    return [*argv, *flags]


FINETUNE_CELLS = {
    "default": [],
    "teacher": ["--teacher"],
    "cls_token": ["--cls_token"],
    "input_size": ["--input_size", "48"],
    "mixup": ["--mixup", "0.8"],
    "cutmix": ["--cutmix", "1.0"],
    "mixup+cutmix+smoothing0": ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0"],
    "cutmix_minmax": ["--cutmix_minmax", "0.2", "0.8"],
    "mixup_pair": ["--mixup", "0.8", "--mixup_mode", "pair"],
    "mixup_elem+switch": ["--mixup", "0.8", "--cutmix", "1.0", "--mixup_mode", "elem", "--mixup_switch_prob", "1"],
    "mixup_prob": ["--mixup", "0.8", "--mixup_prob", "0.5"],
    "no_smoothing": ["--smoothing", "0"],
    "no_randaugment+color_jitter": ["--aa", "", "--color_jitter", "0.4"],
    "reprob+remode+recount": ["--reprob", "0.5", "--remode", "const", "--recount", "2"],
    "crop_scale+hflip": ["--crop_scale", "0.08", "1", "--hflip", "0.5"],
    "layer_decay": ["--layer_decay", "0.5"],
    "drop_path": ["--drop_path", "0.3"],
    "model_ema": ["--model_ema", "--model_ema_decay", "0.9"],
    "model_ema+mixup": ["--model_ema", "--model_ema_decay", "0.9", "--mixup", "0.8"],
    "accum_iter": ["--accum_iter", "2"],
    "accum_iter+model_ema": ["--accum_iter", "2", "--model_ema"],
    "nb_classes": ["--nb_classes", "5"],
    "mean_std": STATS,
    "amp_bf16": ["--amp", "bf16"],
    "clip_grad": ["--clip_grad", "1.0"],
    "bad_images_skip": ["--bad_images", "skip"],
    "deterministic": ["--deterministic"],
}


@pytest.mark.parametrize("flags", FINETUNE_CELLS.values(), ids=FINETUNE_CELLS.keys())
def test_finetuning_cell(data, checkpoint, tmp_path, flags):
    out = tmp_path / "out"
    main_finetune.main(main_finetune.get_args_parser().parse_args(_common(data, out, checkpoint, flags)))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"]) and record["test_count"] == 8
    assert ("test_ema_acc1" in record) == ("--model_ema" in flags)
    assert len(_events(out).Scalars("test/acc1")) == 1
    res = main_finetune.get_args_parser().parse_args(
        _common(data, tmp_path / "eval", checkpoint, ["--eval", "--resume", str(out / "checkpoint-last.pth"), *flags]))
    main_finetune.main(res)


PROBE_CELLS = {
    "lars": [],
    "sgd": ["--optimizer", "sgd"],
    "teacher": ["--teacher"],
    "global_pool": ["--global_pool"],
    "global_pool+teacher": ["--global_pool", "--teacher"],
    "crop_scale+hflip": ["--crop_scale", "0.08", "1", "--hflip", "0.5"],
    "accum_iter": ["--accum_iter", "2"],
    "accum_iter+sgd": ["--accum_iter", "2", "--optimizer", "sgd"],
    "weight_decay": ["--weight_decay", "0.01"],
    "input_size": ["--input_size", "48"],
    "mean_std": STATS,
    "bad_images_skip": ["--bad_images", "skip"],
    "deterministic": ["--deterministic"],
}


@pytest.mark.parametrize("flags", PROBE_CELLS.values(), ids=PROBE_CELLS.keys())
def test_linear_probing_cell(data, checkpoint, tmp_path, flags):
    out = tmp_path / "out"
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(_common(data, out, checkpoint, flags)))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"]) and record["test_count"] == 8
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(
        _common(data, tmp_path / "eval", checkpoint, ["--eval", "--resume", str(out / "checkpoint-last.pth"), *flags])))


KNN_CELLS = {
    "default": [],
    "teacher": ["--teacher"],
    "global_pool": ["--global_pool"],
    "nb_knn+temperature": ["--nb_knn", "1", "3", "--temperature", "0.5"],
    "input_size": ["--input_size", "48"],
    "mean_std": STATS,
    "amp_bf16": ["--amp", "bf16"],
    "bad_images_skip": ["--bad_images", "skip"],
    "deterministic": ["--deterministic"],
}


@pytest.mark.parametrize("flags", KNN_CELLS.values(), ids=KNN_CELLS.keys())
def test_knn_cell(data, checkpoint, tmp_path, flags):
    out = tmp_path / "out"
    argv = [*_common(data, out, checkpoint, flags, training=False), "--dump_features", str(tmp_path / "features")]
    main_knn.main(main_knn.get_args_parser().parse_args(argv))
    record = json.loads((out / "log_knn.txt").read_text().splitlines()[-1])
    ks = [int(k) for k in flags[flags.index("--nb_knn") + 1:flags.index("--temperature")]] if "--nb_knn" in flags \
        else [10, 20, 100, 200]
    assert all(0.0 <= record[f"k{k}_acc1"] <= 100.0 for k in ks)
    reloaded = main_knn.get_args_parser().parse_args(["--load_features", str(tmp_path / "features"), "--output_dir",
                                                      str(out), *(["--nb_knn", *map(str, ks)])])
    main_knn.main(reloaded)
    again = json.loads((out / "log_knn.txt").read_text().splitlines()[-1])
    assert [again[f"k{k}_acc1"] for k in ks] == [record[f"k{k}_acc1"] for k in ks]
