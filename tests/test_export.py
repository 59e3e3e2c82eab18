"""export.py, the loading API (models_vit `pretrained=`, hubconf) and visualize.py."""
import argparse
import json

import pytest
import torch
from PIL import Image

import export
import models_vit
from models_hpm import create_pretrain_model
from models_vit import create_classifier
from tests.helpers import run_script, snapshot
from util.checkpoint import load_file
from util.errors import UserError, run_cli

IMGS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _ours_features(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Class token after norm and mean-pooled patch tokens after norm, from our classifier."""
    model = create_classifier("vit_tiny_patch4", num_classes=0, global_pool=False).eval()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    with torch.no_grad():
        tokens = model.forward_features(IMGS)
    return tokens[:, 0], tokens[:, 1:].mean(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny HPM network as ours, the reference's and MAE's checkpoint formats."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    student = create_pretrain_model("mae_vit_tiny_patch4").state_dict()
    torch.manual_seed(1)
    teacher = create_pretrain_model("mae_vit_tiny_patch4").state_dict()
    files = {
        "ours": {"format": "hpm-pretrain", "version": 1, "model_name": "mae_vit_tiny_patch4", "model": student,
                 "teacher": teacher, "next_epoch": 1, "args": {"model": "mae_vit_tiny_patch4"}},
        "reference": {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in student.items()},
                      "ema_state_dict": teacher, "model": "mae_vit_tiny_patch4"},
        "mae": {"model": student, "args": argparse.Namespace(model="mae_vit_tiny_patch4")},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = root / f"{name}.pth"
        torch.save(obj, paths[name])
    return paths, student, teacher


@pytest.mark.parametrize("source", ["ours", "reference", "mae"])
@pytest.mark.parametrize("use_teacher", [False, True])
def test_every_format_round_trips_with_equal_features(tmp_path, checkpoints, source, use_teacher):
    import timm
    from transformers import ViTMAEModel
    paths, student, teacher = checkpoints
    if use_teacher and source == "mae":
        with pytest.raises(UserError, match="drop --teacher"):
            export.export(str(paths[source]), "mae", str(tmp_path / "x.pth"), teacher=True)
        return
    expect_cls, expect_mean = _ours_features(teacher if use_teacher else student)

    mae_file = tmp_path / "mae.pth"
    export.export(str(paths[source]), "mae", str(mae_file), teacher=use_teacher)
    mae = load_file(mae_file)["model"]
    assert not any(k.startswith(("decoder", "mask_token", "head")) for k in mae)
    cls, mean = _ours_features(mae)
    torch.testing.assert_close(cls, expect_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, expect_mean, atol=1e-5, rtol=0)

    timm_dir = tmp_path / "timm"
    export.export(str(paths[source]), "timm", str(timm_dir), teacher=use_teacher)
    config = json.loads((timm_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(timm_dir / "model.safetensors")),
                              **config["model_args"]).eval()      # timm loads strictly: no missing or extra keys
    with torch.no_grad():
        tokens = model.forward_features(IMGS)
        torch.testing.assert_close(model(IMGS), expect_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens[:, 1:].mean(1), expect_mean, atol=1e-5, rtol=0)
    local = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(IMGS), expect_cls, atol=1e-5, rtol=0)

    hf_dir = tmp_path / "hf"
    export.export(str(paths[source]), "hf", str(hf_dir), teacher=use_teacher)
    hf, info = ViTMAEModel.from_pretrained(str(hf_dir), output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        hidden = hf.eval()(pixel_values=IMGS, noise=torch.arange(64.0).expand(3, -1)).last_hidden_state
    torch.testing.assert_close(hidden[:, 0], expect_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[:, 1:].mean(1), expect_mean, atol=1e-5, rtol=0)

    for folder in (timm_dir, hf_dir, mae_file):       # the loading API reads every export back
        loaded = models_vit.vit_tiny_patch4(pretrained=str(folder), num_classes=0, global_pool=False).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(IMGS), expect_cls, atol=1e-5, rtol=0)


def test_torch_hub_loads_a_checkpoint_from_a_local_clone(checkpoints):
    from tests.helpers import REPO
    paths, student, teacher = checkpoints
    model = torch.hub.load(str(REPO), "hpm_vit_tiny_patch4", source="local", checkpoint=str(paths["reference"]),
                           teacher=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMGS), _ours_features(teacher)[0], atol=1e-5, rtol=0)


def test_fine_tuned_classifier_exports_without_its_head(tmp_path):
    model = create_classifier("vit_tiny_patch4", num_classes=10, global_pool=True)
    path = tmp_path / "ft.pth"
    torch.save({"format": "hpm-finetune", "version": 1, "model": model.state_dict()}, path)
    notes = export.export(str(path), "mae", str(tmp_path / "enc.pth"))
    assert any("head was dropped" in n for n in notes)
    exported = load_file(tmp_path / "enc.pth")["model"]
    assert "fc_norm.weight" in exported and not any(k.startswith("head.") for k in exported)


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: export.main(export.get_args_parser().parse_args(argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, checkpoints, capsys):
    paths = checkpoints[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = snapshot(out)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(paths["ours"].read_bytes()[:3000])
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, evil)
    no_encoder = tmp_path / "decoders_only.pth"
    torch.save({"format": "hpm-pretrain", "model": {"decoder_pred.weight": torch.zeros(2, 2)}}, no_encoder)
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth"), "--format", "mae", "--output", str(tmp_path / "a")],
         "no such file"),
        (["--checkpoint", str(truncated), "--format", "timm", "--output", str(tmp_path / "b")], "truncated"),
        (["--checkpoint", str(evil), "--format", "mae", "--output", str(tmp_path / "c")], "refused to load"),
        (["--checkpoint", str(no_encoder), "--format", "hf", "--output", str(tmp_path / "d")], "holds no ViT encoder"),
        (["--checkpoint", str(paths["ours"]), "--format", "timm", "--output", str(out)], "pass --force"),
    ]
    for argv, words in cases:
        assert words in _cli(argv, capsys)
    assert "payload ran" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", "truncated.pth", "evil.pth", "decoders_only.pth"])
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    res = run_script("export.py", "--checkpoint", str(paths["ours"]), "--format", "onnx", "--output",
                     str(tmp_path / "e"))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --format onnx: unknown; choose one of mae, timm, hf, videomae"
    assert not (tmp_path / "e").exists()
    export.export(str(paths["ours"]), "timm", str(out), force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_visualize_writes_a_labelled_grid_of_the_right_size(tmp_path, checkpoints):
    import visualize
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (64, 64), (17, 50)]):
        Image.new("RGB", size, (40 * i, 100, 200 - 50 * i)).save(folder / f"{i}.png")
    norm_pix = load_file(checkpoints[0]["ours"])   # norm-pix targets, dataset statistics
    norm_pix["args"] = {**norm_pix["args"], "norm_pix_loss": True, "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}
    torch.save(norm_pix, tmp_path / "norm_pix.pth")
    sources = {**checkpoints[0], "norm_pix": tmp_path / "norm_pix.pth"}
    for source, rows in (("ours", 4), ("mae", 3), ("norm_pix", 4)):
        out = tmp_path / f"{source}.png"
        args = visualize.get_args_parser().parse_args(["--checkpoint", str(sources[source]), "--images",
                                                       str(folder), "--output", str(out), "--num_images", "3"])
        visualize.main(args)
        with Image.open(out) as png:
            assert png.size == (int((visualize.INCHES_PER_IMAGE * 3 + 1.0) * visualize.DPI),
                                int(visualize.INCHES_PER_IMAGE * rows * visualize.DPI))
