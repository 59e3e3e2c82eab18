import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import TINY, make_image_folder, run_script
from util.checkpoint import load_file


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("mode,data", [([], "digits"),
                                       pytest.param(["--no-relative"], "folder", marks=pytest.mark.slow),
                                       (["--no-learning_loss"], "folder")], ids=["hpm", "hpm_abs", "mae"])
def test_pretrain_end_to_end(tmp_path, mode, data):
    out = tmp_path / "out"
    if data == "folder":
        make_image_folder(tmp_path / "data", classes=2, per_class=16, size=32)
        mode = [*mode, "--data_path", str(tmp_path / "data")]
    if data == "digits":
        mode = [*mode, "--batch_size", "64"]     # 22 steps per epoch
    res = run_script("main_pretrain.py", "--epochs", "2", "--output_dir", str(out), *TINY, *mode)
    assert res.returncode == 0, res.stderr
    assert "eta" in res.stdout
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert torch.isfinite(torch.tensor(r["train_total"])) and "train_loss" not in r
        assert ("train_loss_pred" in r) == ("--no-learning_loss" not in mode)
        assert r["train_total"] == pytest.approx(r["train_recon"] + r.get("train_loss_pred", 0.0), rel=1e-5)
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["format"] == "hpm-pretrain" and ckpt["next_epoch"] == 2 and ckpt["version"] == 1
    assert (ckpt["teacher"] is None) == ("--no-learning_loss" in mode)
    assert ckpt["args"]["relative"] == ("--no-relative" not in mode)
    assert (out / "checkpoint-1.pth").is_file()
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert "reconstruction" in events.Tags()["images"]
    assert len(events.Images("reconstruction")) == 2
    assert {"train/recon", "train/total", "train/lr"} <= set(events.Tags()["scalars"])
    assert ("train/loss_pred" in events.Tags()["scalars"]) == ("--no-learning_loss" not in mode)
    assert "recon" in res.stdout and "total" in res.stdout


@pytest.mark.slow
def test_compiled_student_and_teacher_train_like_eager(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=16, size=32)
    logs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        res = run_script("main_pretrain.py", "--epochs", "2", "--output_dir", str(out), "--data_path",
                         str(tmp_path / "data"), *TINY, *extra)
        assert res.returncode == 0, res.stderr
        logs[name] = _log(out)
    for eager, compiled in zip(logs["eager"], logs["compiled"]):   # epoch 1 masks through the teacher
        for key in ("train_total", "train_recon", "train_loss_pred"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3)


def test_resume_is_exact_and_restores_teacher(tmp_path):
    """Resuming from the epoch-0 checkpoint of a 2-epoch run ends bit-identical to that run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    make_image_folder(tmp_path / "data", classes=2, per_class=16, size=40)
    common = [*TINY, "--epochs", "2", "--warmup_epochs", "1", "--save_every", "1", "--batch_size", "8",
              "--num_workers", "2", "--data_path", str(tmp_path / "data")]
    assert run_script("main_pretrain.py", "--output_dir", str(straight), *common).returncode == 0
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-0.pth", resumed / "checkpoint-last.pth")
    res = run_script("main_pretrain.py", "--output_dir", str(resumed), *common)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "at epoch 1" in res.stdout
    assert [r["epoch"] for r in _log(resumed)] == [1]
    a, b = load_file(straight / "checkpoint-last.pth"), load_file(resumed / "checkpoint-last.pth")
    assert b["teacher"] is not None
    for key in ("model", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_image_folder_and_list_file(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, modes=("RGB", "RGBA", "L", "CMYK", "I;16", "P"))
    out = tmp_path / "out"
    args = ["--epochs", "1", "--batch_size", "8", "--num_workers", "1", "--no-learning_loss"]
    res = run_script("main_pretrain.py", "--data_path", str(data), "--output_dir", str(out), *args)
    assert res.returncode == 0, res.stderr
    assert "on 24 images" in res.stdout
    # the same images through a UM-MAE list file (paths relative to DIR/train)
    listed = tmp_path / "listed"
    shutil.copytree(data / "train", listed / "train")
    (listed / "train.txt").write_text((data / "train.list").read_text())
    shutil.rmtree(listed / "train" / "class_1")
    (listed / "train" / "class_1").mkdir()
    lines = [ln for ln in (data / "train.list").read_text().splitlines() if ln.startswith("class_0")]
    (listed / "train.txt").write_text("\n".join(lines) + "\n")
    res = run_script("main_pretrain.py", "--data_path", str(listed), "--output_dir", str(tmp_path / "o2"), *args)
    assert res.returncode == 0, res.stderr
    assert "on 12 images" in res.stdout


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_picture_of_a_perfect_prediction_is_the_input(norm_pix):
    """The picture's un-normalisation: a prediction equal to the training target (per-patch
    standardised with norm_pix_loss) pasted back gives the input image, on non-ImageNet statistics."""
    from engine_pretrain import reconstruction_rows
    from models_hpm import HPMOutput, create_pretrain_model
    from util.masking import random_mask
    from util.normalization import Stats
    from util.patches import gather_patches
    stats = Stats((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
    student = create_pretrain_model("mae_vit_tiny_patch4", norm_pix_loss=norm_pix)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imgs = (pixels - torch.tensor(stats.mean).view(1, 3, 1, 1)) / torch.tensor(stats.std).view(1, 3, 1, 1)
    mask = random_mask(2, 64, student.num_masked, generator=torch.Generator().manual_seed(1))
    out = student(imgs, mask)
    target = gather_patches(student.patchify(imgs), out.ids_masked)
    if norm_pix:   # the training target: each patch standardised on its own (hpm-spec)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    student.forward = lambda imgs, mask: HPMOutput(target, out.loss_pred, out.latent, out.ids_masked)
    original, masked, recon = reconstruction_rows(student, imgs, mask, stats)
    torch.testing.assert_close(original, pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(recon, pixels, atol=1e-4, rtol=0)
    visible = (~mask).view(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3).expand_as(pixels)
    torch.testing.assert_close(masked[visible], pixels[visible], atol=1e-5, rtol=0)


def test_the_epoch_is_saved_before_its_picture(tmp_path):
    """Killed at the end of epoch 0, after its training and before its picture: the epoch is on disk
    and the rerun starts at epoch 1."""
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    common = ["--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--epochs", "2",
              *TINY, "--batch_size", "8", "--norm_pix_loss"]
    res = run_script("main_pretrain.py", *common, env={"HPM_FAULT": "point=end_epoch,at=1,action=SIGKILL"})
    assert res.returncode == -9
    assert load_file(tmp_path / "out" / "checkpoint-last.pth")["next_epoch"] == 1
    res = run_script("main_pretrain.py", *common)
    assert res.returncode == 0, res.stderr
    assert "at epoch 1" in res.stdout and [r["epoch"] for r in _log(tmp_path / "out")] == [1]


def test_a_failing_picture_is_a_warning_and_training_goes_on(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    res = run_script("main_pretrain.py", "--data_path", str(tmp_path / "data"), "--output_dir", str(out),
                     "--epochs", "2", *TINY, "--batch_size", "8", env={"HPM_FAULT": "point=picture,at=1,action=error"})
    assert res.returncode == 0, res.stderr
    assert "the reconstruction picture of epoch 0 failed (RuntimeError: fault injected at picture)" in res.stdout
    assert [r["epoch"] for r in _log(out)] == [0, 1]
    assert len(EventAccumulator(str(out), size_guidance={"images": 0}).Reload().Images("reconstruction")) == 1


def test_the_epoch_picture_does_not_recompile_the_compiled_networks(monkeypatch, tmp_path):
    """--compile: the picture's batch of 8 runs the eager teacher, so the compiled teacher pass keeps
    the training batch's static graph (a recompile would also switch training to dynamic shapes)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch.utils.tensorboard import SummaryWriter

    import main_pretrain
    from engine_pretrain import PretrainTask, build_student
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    args = main_pretrain.get_args_parser().parse_args(["--compile", "--epochs", "2"])
    task = PretrainTask(build_student(args), args, torch.device("cpu"), None, preview=torch.randn(8, 3, 32, 32))
    batch = (torch.randn(16, 3, 32, 32),)
    task.forward(batch, epoch=1)                          # alpha > 0: the compiled teacher chooses the mask
    compiled = counter.frame_count
    assert compiled >= 2                                  # the student and the teacher's pass
    writer = SummaryWriter(str(tmp_path))
    task.log_images(writer, 1)
    task.forward(batch, epoch=1)
    writer.close()
    assert counter.frame_count == compiled
    torch._dynamo.reset()
