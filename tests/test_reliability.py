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


def _checkpoints_load(out) -> None:
    """checkpoint-last.pth and the newest numbered checkpoint are complete and loadable."""
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["format"] == "hpm-pretrain" and ckpt["next_epoch"] >= 1
    numbered = sorted(out.glob("checkpoint-[0-9]*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    if numbered:   # a kill between the first epoch's two saves leaves checkpoint-last.pth alone
        load_file(numbered[-1])


def _finish(out, common, epochs_done) -> None:
    """A rerun of the same command resumes, cleans up, and logs the remaining epochs."""
    res = run_script("main_pretrain.py", *common, "--epochs", str(epochs_done + 2))
    assert res.returncode == 0, res.stderr
    assert not _temp_files(out)
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs[-2:] == [epochs_done, epochs_done + 1]


def _kill_common(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    return out, ["--data_path", str(tmp_path / "data"), "--output_dir", str(out), "--batch_size", "8",
                 "--num_workers", "0", "--save_every", "1", "--print_freq", "50"]


# the 1st save (no previous checkpoint) and the 4th (checkpoint-1.pth, after checkpoint-last.pth of epoch 1)
@pytest.mark.parametrize("save", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_sigkill_between_temp_file_and_rename_keeps_the_previous_checkpoint(tmp_path, save):
    """Killed at the named point where a checkpoint's bytes are on disk under the temporary name but
    not yet renamed: the previous checkpoint is intact, the next run removes the temporary file."""
    out, common = _kill_common(tmp_path)
    fault = {"HPM_FAULT": f"point=save,at={save},action=SIGKILL"}
    res = run_script("main_pretrain.py", *common, "--epochs", "50", env=fault)
    assert res.returncode == -signal.SIGKILL
    assert len(_temp_files(out)) == 1
    saves_done = save - 1                       # each finished epoch saves checkpoint-last, then checkpoint-<e>
    if saves_done == 0:
        assert not (out / "checkpoint-last.pth").exists()
        epochs_done = 0
    else:
        _checkpoints_load(out)
        epochs_done = load_file(out / "checkpoint-last.pth")["next_epoch"]
        assert epochs_done == (saves_done + 1) // 2
    _finish(out, common, epochs_done)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """6 runs killed with SIGKILL at random times: after each kill the last checkpoint loads; a
    final rerun finishes the requested epochs. On a loaded machine a kill may come before the first
    checkpoint (even before the first step): a valid outcome, after which the rerun starts afresh."""
    out, common = _kill_common(tmp_path)
    rng = random.Random(0)
    for _ in range(6):
        proc = _start(*common, "--epochs", "400")
        time.sleep(rng.uniform(4.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "checkpoint-last.pth").exists():
            _checkpoints_load(out)
    last = out / "checkpoint-last.pth"
    _finish(out, common, load_file(last)["next_epoch"] if last.exists() else 0)


def _state(path):
    ckpt = load_file(path)
    return {f"{part}.{k}": v for part in ("model", "teacher", "model_ema") if ckpt.get(part)
            for k, v in ckpt[part].items()}


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
    stopped = run_script("main_pretrain.py", *common, "--output_dir", str(out),
                         env={"HPM_FAULT": "point=step,at=5,action=SIGTERM"})   # during step 4 of epoch 0
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert "SIGTERM: saved epoch 0 at step 5" in stopped.stdout
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["next_epoch"] == 0 and ckpt["next_step"] == 5 and ckpt["rng"] is not None
    res = run_script("main_pretrain.py", *common, "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    assert "at epoch 0, step 5" in res.stdout
    _assert_identical(_state(tmp_path / "straight" / "checkpoint-last.pth"), _state(out / "checkpoint-last.pth"))


@pytest.mark.slow
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
    common = ["--data_path", str(tmp_path / "data"), "--batch_size", "8", "--num_workers", "0",
              "--output_dir", str(out),
              "--print_freq", "1", "--warmup_epochs", "0", "--clip_grad", "0"]
    assert run_script("main_pretrain.py", *common, "--epochs", "1").returncode == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    res = run_script("main_pretrain.py", *common, "--epochs", "3", "--lr", "1e30", "--resume",
                     str(out / "checkpoint-last.pth"))   # on purpose: another learning rate is another run
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


@pytest.mark.slow
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


def _cluster_common(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    return out, ["--data_path", str(tmp_path / "data"), "--output_dir", str(out), "--batch_size", "8",
                 "--num_workers", "0", "--save_every", "1", "--print_freq", "50"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_stops_or_retries(tmp_path):
    """ENOSPC injected at the third checkpoint write (checkpoint-last.pth after epoch 1)."""
    out, common = _cluster_common(tmp_path)
    full_disk = {"HPM_FAULT": "point=write,at=3,action=oserror"}
    res = run_script("main_pretrain.py", *common, "--epochs", "3", env=full_disk)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert f"saving a checkpoint in {out} failed" in err[0] and "MiB are free" in err[0] and "--save_retry" in err[0]
    assert not _temp_files(out) and not list(out.glob(".*.tmp"))
    assert load_file(out / "checkpoint-last.pth")["next_epoch"] == 1
    assert _checksum_ok(out / "checkpoint-last.pth")
    retried = tmp_path / "retry"
    res = run_script("main_pretrain.py", *common, "--epochs", "3", "--save_retry", "--output_dir", str(retried),
                     env=full_disk)
    assert res.returncode == 0, res.stderr
    assert "training goes on (--save_retry)" in res.stdout
    assert load_file(retried / "checkpoint-last.pth")["next_epoch"] == 3


def _checksum_ok(path) -> bool:
    from util.checkpoint import checksum_path, file_sha256
    return checksum_path(path).read_text().split()[0] == file_sha256(path)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    out, common = _cluster_common(tmp_path)
    assert run_script("main_pretrain.py", *common, "--epochs", "2").returncode == 0
    last = out / "checkpoint-last.pth"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # a flipped bit in the middle
    last.write_bytes(bytes(data))
    res = run_script("main_pretrain.py", *common, "--epochs", "2", "--resume", str(last))
    assert res.returncode == 2 and "SHA-256 differs" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_script("main_pretrain.py", *common, "--epochs", "3")
    assert res.returncode == 0, res.stderr
    assert f"{last} is damaged" in res.stdout and f"resuming from {out / 'checkpoint-1.pth'}" in res.stdout
    assert "at epoch 2" in res.stdout and load_file(last)["next_epoch"] == 3
    for path in out.glob("checkpoint-*.pth"):                     # every file damaged: an error, not a fresh start
        path.write_bytes(path.read_bytes()[:1000])
    res = run_script("main_pretrain.py", *common, "--epochs", "4")
    assert res.returncode == 2 and "every checkpoint there is damaged" in res.stderr
