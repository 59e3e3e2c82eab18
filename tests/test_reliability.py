"""Crashes, kills, preemption, divergence and damaged inputs never lose work or hide the cause."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, make_image_folder, run_script
from util.checkpoint import load_file
from util.data import load_rgb
from util.preemption import EXIT_PREEMPTED

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "main_pretrain.py"), *args], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _temp_files(out):
    return [p for p in out.glob(".checkpoint-*.tmp")] if out.exists() else []


def test_sigkill_at_random_moments_and_during_saves(tmp_path):
    """12 runs killed with SIGKILL (6 at random times, 6 while a checkpoint is being written):
    after each kill the last checkpoint loads; a final rerun finishes the requested epochs."""
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    common = ["--data_path", str(tmp_path / "data"), "--output_dir", str(out), "--batch_size", "8",
              "--num_workers", "0", "--save_every", "1", "--print_freq", "50"]
    args = [*common, "--epochs", "400"]
    rng = random.Random(0)
    during_save = 0
    for run in range(12):
        proc = _start(*args)
        if run % 2 == 0:
            time.sleep(rng.uniform(4.0, 9.0))
        else:   # wait for a save in progress, then kill it in the middle
            deadline = time.time() + 60
            while not _temp_files(out) and time.time() < deadline and proc.poll() is None:
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if run % 2 == 1 and _temp_files(out):
            during_save += 1
        last = out / "checkpoint-last.pth"
        if last.exists():
            ckpt = load_file(last)
            assert ckpt["format"] == "hpm-pretrain" and ckpt["next_epoch"] >= 1
            numbered = sorted(out.glob("checkpoint-[0-9]*.pth"), key=lambda p: int(p.stem.split("-")[1]))
            load_file(numbered[-1])
    print(f"SIGKILL: 12 kills survived, {during_save} of them during a save")
    assert during_save >= 3, f"only {during_save} of 6 kills landed during a save"
    reached = load_file(out / "checkpoint-last.pth")["next_epoch"]
    res = run_script("main_pretrain.py", *common, "--epochs", str(reached + 2))
    assert res.returncode == 0, res.stderr
    assert not _temp_files(out)
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs[-2:] == [reached, reached + 1]
    shutil.rmtree(out)


def _state(path):
    ckpt = load_file(path)
    return {f"{part}.{k}": v for part in ("model", "teacher", "model_ema") if ckpt.get(part) for k, v in ckpt[part].items()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_sigterm_stops_after_the_step_and_resume_is_bit_identical(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=24, size=32)
    common = ["--data_path", str(tmp_path / "data"), "--epochs", "2", "--batch_size", "4", "--num_workers", "1",
              "--print_freq", "1", "--warmup_epochs", "1"]
    straight = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "stopped"
    proc = _start(*common, "--output_dir", str(out))
    for line in proc.stdout:   # stop in the middle of epoch 0
        if "Epoch [0/2] [5/12]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, rest
    assert "SIGTERM: saved epoch 0 at step" in rest
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["next_epoch"] == 0 and 5 <= ckpt["next_step"] < 12 and ckpt["rng"] is not None
    res = run_script("main_pretrain.py", *common, "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    assert f"at epoch 0, step {ckpt['next_step']}" in res.stdout
    _assert_identical(_state(tmp_path / "straight" / "checkpoint-last.pth"), _state(out / "checkpoint-last.pth"))


def test_finetune_resume_is_bit_identical(tmp_path, pretrained_checkpoint):
    common = ["--finetune", str(pretrained_checkpoint), "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "128",
              "--num_workers", "1", "--save_every", "1", "--mixup", "0.8", "--cutmix", "1.0", "--model_ema",
              "--model_ema_decay", "0.9"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script("main_finetune.py", *common, "--output_dir", str(straight)).returncode == 0
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-0.pth", resumed / "checkpoint-last.pth")
    res = run_script("main_finetune.py", *common, "--output_dir", str(resumed))
    assert res.returncode == 0, res.stderr
    assert "at epoch 1" in res.stdout
    _assert_identical(_state(straight / "checkpoint-last.pth"), _state(resumed / "checkpoint-last.pth"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    common = ["--data_path", str(tmp_path / "data"), "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out),
              "--print_freq", "1", "--warmup_epochs", "0", "--clip_grad", "0"]
    assert run_script("main_pretrain.py", *common, "--epochs", "1").returncode == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    res = run_script("main_pretrain.py", *common, "--epochs", "3", "--lr", "1e30")
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "epoch 1, step" in err[0], err
    assert "loss" in err[0] and "checkpoint is kept" in err[0]
    assert (out / "checkpoint-last.pth").read_bytes() == before


@pytest.mark.parametrize("mode", ["CMYK", "L", "I;16", "RGBA", "P", "LA"])
def test_image_modes_load_as_8bit_rgb(tmp_path, mode):
    arr = np.random.RandomState(0).randint(0, 255, (10, 12, 3), dtype=np.uint8)
    if mode == "I;16":
        img, ext = Image.fromarray(arr[..., 0].astype(np.uint16) * 257), ".png"
    else:
        img, ext = Image.fromarray(arr).convert(mode), (".jpg" if mode == "CMYK" else ".png")
    img.save(tmp_path / f"x{ext}")
    out = load_rgb(str(tmp_path / f"x{ext}"))
    assert out.mode == "RGB" and out.size == (12, 10)
    if mode == "I;16":   # 16-bit values are scaled, not clipped
        assert np.abs(np.asarray(out)[..., 0].astype(int) - arr[..., 0]).max() <= 1


def test_corrupt_jpeg_is_skipped_with_a_warning_when_asked(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    bad = tmp_path / "data" / "train" / "class_1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    common = ["--data_path", str(tmp_path / "data"), "--epochs", "1", "--batch_size", "4", "--num_workers", "0",
              "--no-learning_loss"]
    res = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "a"))
    assert res.returncode == 2 and "broken.jpg" in res.stderr and "--bad_images skip" in res.stderr
    res = run_script("main_pretrain.py", *common, "--bad_images", "skip", "--output_dir", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    assert "skipped:" in res.stdout and "broken.jpg" in res.stdout and "skipped in this process" in res.stdout
