"""Normalisation that follows the data: computed statistics, their trip through the checkpoint
into every downstream script, the ImageNet fallback and the one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests.helpers import run_script
from util.checkpoint import load_file
from util.data import build_dataset, with_transform
from util.errors import UserError
from util.normalization import IMAGENET, Stats, dataset_stats, downstream_stats, explicit_stats


def _colour_folder(root, colours, per_colour: int, size: int = 12, split: str = "train") -> None:
    for c, colour in enumerate(colours):
        d = root / split / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            Image.new("RGB", (size + i % 3, size), colour).save(d / f"img_{i}.png")


def test_statistics_of_a_folder_with_known_values(tmp_path):
    """Half the pixels (10, 20, 30), half (50, 60, 90): mean (30, 40, 60) / 255, std (20, 20, 30) / 255."""
    _colour_folder(tmp_path, [(10, 20, 30), (50, 60, 90)], per_colour=6)
    dataset = build_dataset(str(tmp_path), "train", transforms.ToTensor())
    stats = dataset_stats(dataset)
    torch.testing.assert_close(torch.tensor(stats.mean), torch.tensor([30.0, 40.0, 60.0]) / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(stats.std), torch.tensor([20.0, 20.0, 30.0]) / 255, atol=1e-6, rtol=0)


def test_sampled_estimate_is_within_a_hundredth_of_the_exact_one(tmp_path):
    """1,500 images whose brightness varies from image to image about as much as photographs' does
    (std about 0.1); a seeded sample of 500 of them."""
    rng = np.random.RandomState(0)
    d = tmp_path / "train" / "c"
    d.mkdir(parents=True)
    for i in range(1500):
        base = np.array([120.0, 110.0, 90.0]) + rng.normal(0, 25, 3)
        arr = np.clip(base + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
    dataset = build_dataset(str(tmp_path), "train", transforms.ToTensor())
    exact = dataset_stats(dataset)
    sampled = dataset_stats(dataset, max_images=500, seed=3)
    assert sampled != exact and sampled == dataset_stats(dataset, max_images=500, seed=3)
    for a, b in zip(exact.mean + exact.std, sampled.mean + sampled.std):
        assert abs(a - b) < 1e-2


@pytest.mark.parametrize("mean, std, words", [
    ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], "every std must be above 0"),
    ([0.5, 0.5, 0.5], [0.2, -1.0, 0.2], "every std must be above 0"),
    ([0.5, 0.5], [0.2, 0.2, 0.2], "3 in all (got 2)"),
    ([0.5, 0.5, 0.5], None, "--mean and --std go together"),
])
def test_bad_values_are_one_line_errors(mean, std, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as exc:
        explicit_stats(mean, std)
    assert "\n" not in str(exc.value)


def test_bad_values_on_the_command_line_stop_before_anything_is_written(tmp_path, capsys):
    import main_pretrain
    from util.errors import run_cli
    out = tmp_path / "out"
    for argv, message in ((["--std", "0.2", "0", "0.2", "--mean", "0.5", "0.5", "0.5"],
                           "error: --std 0.2 0.0 0.2: every std must be above 0"),
                          (["--std", "0.2", "0.2"], "expected 3 arguments")):
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args(
                [*argv, "--output_dir", str(out), "--epochs", "1", "--num_workers", "0"])))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and message in err[-1]
    assert not out.exists()


def test_old_and_foreign_checkpoints_mean_imagenet(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}}, path)
    assert downstream_stats(str(path), None, None) == IMAGENET
    assert downstream_stats(None, None, None) == IMAGENET
    ours = tmp_path / "ours.pth"
    torch.save({"format": "hpm-pretrain", "model": {}, "normalization": {"mean": [0.1, 0.2, 0.3],
                                                                            "std": [0.4, 0.5, 0.6]}}, ours)
    assert downstream_stats(str(ours), None, None) == Stats((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert downstream_stats(str(ours), [0.5] * 3, [0.5] * 3) == Stats((0.5,) * 3, (0.5,) * 3)   # flags win


def _digits_stats() -> Stats:
    return dataset_stats(with_transform(build_dataset(None, "train", None), transforms.ToTensor()))


@pytest.mark.slow
def test_digits_with_dataset_statistics_round_trip_into_every_downstream_script(tmp_path):
    """`--norm dataset` on the built-in digits end to end: the statistics are computed, logged,
    stored in the checkpoint and used by fine-tuning, probing and kNN (with a log line saying so);
    explicit --mean/--std override them with a warning."""
    pre = tmp_path / "pre"
    res = run_script("main_pretrain.py", "--norm", "dataset", "--epochs", "1", "--num_workers", "0",
                     "--output_dir", str(pre))
    assert res.returncode == 0, res.stderr
    expected = _digits_stats()
    assert abs(expected.mean[0] - IMAGENET.mean[0]) > 0.15   # dark digits: far from ImageNet's statistics
    ckpt = load_file(pre / "checkpoint-last.pth")
    torch.testing.assert_close(torch.tensor(ckpt["normalization"]["mean"]), torch.tensor(expected.mean))
    assert ckpt["args"]["std"] == ckpt["normalization"]["std"] and ckpt["args"]["norm"] == "dataset"
    assert "computed from the training set" in res.stdout
    weights = str(pre / "checkpoint-last.pth")
    common = ["--finetune", weights, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "128",
              "--num_workers", "0"]
    for script in ("main_finetune.py", "main_linprobe.py"):
        out = tmp_path / script
        res = run_script(script, *common, "--output_dir", str(out))
        assert res.returncode == 0, res.stderr
        assert f"normalisation: {expected} (from {weights})" in res.stdout
        assert load_file(out / "checkpoint-last.pth")["normalization"] == ckpt["normalization"]
    knn = tmp_path / "knn"
    res = run_script("main_knn.py", "--finetune", weights, "--num_workers", "0", "--nb_knn", "10",
                     "--output_dir", str(knn))
    assert res.returncode == 0, res.stderr
    assert json.loads((knn / "log_knn.txt").read_text())["mean"] == ckpt["normalization"]["mean"]
    res = run_script("main_knn.py", "--finetune", weights, "--num_workers", "0", "--nb_knn", "10",
                     "--output_dir", str(knn), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25")
    assert res.returncode == 0, res.stderr
    assert "differ from the statistics checkpoint-last.pth was trained with" in res.stdout
    assert json.loads((knn / "log_knn.txt").read_text().splitlines()[-1])["mean"] == [0.5, 0.5, 0.5]
    for fmt, config in (("timm", lambda c: c["pretrained_cfg"]), ("hf", lambda c: {"mean": c["image_mean"]})):
        res = run_script("export.py", "--checkpoint", weights, "--format", fmt, "--output", str(tmp_path / fmt))
        assert res.returncode == 0, res.stderr
        assert config(json.loads((tmp_path / fmt / "config.json").read_text()))["mean"] == ckpt["normalization"]["mean"]
        pixel = Stats(tuple(255 * m for m in expected.mean), tuple(255 * s for s in expected.std))
        assert f"normalisation: {expected} on [0, 1] pixels" in res.stdout and f"RGB): {pixel}; see" in res.stdout
