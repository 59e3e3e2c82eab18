import argparse
import json
import os
import pickle

import pytest
import torch

from models_hpm import create_pretrain_model
from models_vit import create_classifier, features
from tests.helpers import TINY, run_script
from util.checkpoint import load_pretrained
from util.errors import UserError


def test_classifier_reproduces_reference(reference):
    for key, global_pool in (("classifier_global_pool", True), ("classifier_cls_token", False)):
        vec = reference[key]
        model = create_classifier("vit_tiny_patch4", num_classes=10, global_pool=global_pool).eval()
        model.load_state_dict(vec["state_dict"], strict=True)
        with torch.no_grad():
            torch.testing.assert_close(features(model, vec["imgs"]), vec["features"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(vec["imgs"]), vec["logits"], atol=1e-5, rtol=1e-5)


def test_registered_classifiers_have_mae_keys():
    with torch.device("meta"):
        gp = create_classifier("vit_base_patch16", num_classes=1000)
        cls = create_classifier("vit_large_patch16", num_classes=1000, global_pool=False)
    keys = set(gp.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "fc_norm.weight", "head.weight"} <= keys
    assert "norm.weight" not in keys and "blocks.11.mlp.fc2.bias" in keys
    assert "norm.weight" in cls.state_dict() and "fc_norm.weight" not in cls.state_dict()
    assert gp.pos_embed.shape == (1, 197, 768)


@pytest.fixture
def pretrained():
    torch.manual_seed(0)
    student = create_pretrain_model("mae_vit_tiny_patch4")
    torch.manual_seed(1)
    teacher = create_pretrain_model("mae_vit_tiny_patch4")
    return student.state_dict(), teacher.state_dict()


def _formats(student, teacher):
    timm_vit = create_classifier("vit_tiny_patch4", num_classes=1000, global_pool=False)
    timm_vit.load_state_dict({k: v for k, v in student.items() if not k.startswith(("decoder", "mask_token"))},
                             strict=False)
    return {
        "ours": {"format": "hpm-pretrain", "version": 1, "model": student, "teacher": teacher, "next_epoch": 3},
        "reference_hpm": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in student.items()},
                          "ema_state_dict": teacher, "optimizer": {}, "loss_scaler": {},
                          "model": "mae_vit_base_patch16_dec512d8b"},
        "mae": {"model": student, "epoch": 3, "args": argparse.Namespace(model="mae_vit_tiny_patch4", lr=1.0)},
        "bare": dict(student),
        "compiled_ddp": {"model": {f"module._orig_mod.{k}": v for k, v in student.items()}},
        "timm": timm_vit.state_dict(),
    }


@pytest.mark.parametrize("fmt", ["ours", "reference_hpm", "mae", "bare", "compiled_ddp", "timm"])
@pytest.mark.parametrize("global_pool", [True, False])
def test_every_checkpoint_format_loads(tmp_path, pretrained, fmt, global_pool):
    student, teacher = pretrained
    path = tmp_path / "ckpt.pth"
    torch.save(_formats(student, teacher)[fmt], path)
    model = create_classifier("vit_tiny_patch4", num_classes=10, global_pool=global_pool)
    missing = load_pretrained(model, path)
    expected = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(missing) == expected
    assert torch.equal(model.blocks[1].attn.qkv.weight, student["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, student["pos_embed"])
    if not global_pool:
        assert torch.equal(model.norm.weight, student["norm.weight"])


@pytest.mark.parametrize("fmt", ["ours", "reference_hpm"])
def test_teacher_flag_picks_ema_weights(tmp_path, pretrained, fmt):
    student, teacher = pretrained
    path = tmp_path / "ckpt.pth"
    torch.save(_formats(student, teacher)[fmt], path)
    model = create_classifier("vit_tiny_patch4", num_classes=10)
    load_pretrained(model, path, teacher=True)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, teacher["blocks.0.mlp.fc1.weight"])


def test_teacher_flag_on_mae_checkpoint_is_clear_error(tmp_path, pretrained):
    path = tmp_path / "mae.pth"
    torch.save({"model": pretrained[0]}, path)
    with pytest.raises(UserError, match="drop --teacher"):
        load_pretrained(create_classifier("vit_tiny_patch4", num_classes=10), path, teacher=True)


def test_wrong_architecture_lists_keys(tmp_path, pretrained):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": pretrained[0]}, path)
    deeper = create_classifier("vit_tiny_patch4", num_classes=10, depth=3)
    with pytest.raises(UserError, match=r"missing: blocks\.2\.") as exc:
        load_pretrained(deeper, path)
    assert "--model" in str(exc.value) and "\n" not in str(exc.value)
    wider = create_classifier("vit_tiny_patch4", num_classes=10, embed_dim=96)
    with pytest.raises(UserError, match="shape mismatch"):
        load_pretrained(wider, path)


def test_pos_embed_resampled_to_new_grid(tmp_path, pretrained):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": pretrained[0]}, path)
    model = create_classifier("vit_tiny_patch4", num_classes=10, img_size=48)   # 8x8 -> 12x12
    load_pretrained(model, path)
    assert model.pos_embed.shape == (1, 145, 64)
    assert torch.equal(model.pos_embed[:, 0], pretrained[0]["pos_embed"][:, 0])


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"model": payload}, path)
    with pytest.raises(UserError, match="refused to load"):
        load_pretrained(create_classifier("vit_tiny_patch4", num_classes=10), path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"model": payload}))
    with pytest.raises(UserError):
        load_pretrained(create_classifier("vit_tiny_patch4", num_classes=10), raw)
    assert not marker.exists()


def test_classifier_features_equal_pretraining_encoder():
    torch.manual_seed(0)
    pre = create_pretrain_model("mae_vit_tiny_patch4").eval()
    cls = create_classifier("vit_tiny_patch4", num_classes=10, global_pool=False).eval()
    cls.load_state_dict({k: v for k, v in pre.state_dict().items() if k in cls.state_dict()}, strict=False)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        latent = pre.forward_encoder(imgs)
        torch.testing.assert_close(cls.forward_features(imgs), latent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features(cls, imgs), latent[:, 0], atol=1e-5, rtol=1e-5)


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_finetune_eval_resume_end_to_end(tmp_path, pretrained_checkpoint):
    ft = tmp_path / "ft"
    common = ["--finetune", str(pretrained_checkpoint), "--output_dir", str(ft), *TINY, "--batch_size", "64",
              "--blr", "2e-3", "--warmup_epochs", "1", "--model_ema"]
    res = run_script("main_finetune.py", "--epochs", "2", *common)
    assert res.returncode == 0, res.stderr
    assert "loaded pretrained weights" in res.stdout
    log = _log(ft / "log.txt")
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert 0 <= r["test_acc1"] <= 100 and r["test_count"] == 359 and "test_ema_acc1" in r
        assert torch.isfinite(torch.tensor(r["train_loss"]))
    best = max(r["test_acc1"] for r in log)
    res = run_script("main_finetune.py", "--eval", "--resume", str(ft / "checkpoint-best.pth"), *TINY)
    assert res.returncode == 0, res.stderr
    assert f"top-1 {best:.2f}%" in res.stdout and "359 validation samples" in res.stdout
    res = run_script("main_finetune.py", "--epochs", "3", *common)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "at epoch 2" in res.stdout
    assert [r["epoch"] for r in _log(ft / "log.txt")] == [0, 1, 2]
