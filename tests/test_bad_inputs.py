"""The bad-input matrix: each case stops with one line on stderr that names the problem and the
fix, a non-zero exit status, and leaves every file already in the output directory as it was."""
import argparse

import pytest
import torch

import main_finetune
import main_knn
import main_pretrain
from models_vit import create_classifier
from tests.helpers import make_image_folder, snapshot, unchanged
from util.errors import run_cli


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, per_class=4, size=32)
    empty = tmp_path / "empty"
    (empty / "train" / "class_0").mkdir(parents=True)
    listed = tmp_path / "listed"
    make_image_folder(listed, per_class=4, size=32)
    (listed / "train.txt").write_text("class_0/img_0.png 0\nclass_0/missing.png 0\n")
    corrupt = tmp_path / "corrupt"
    make_image_folder(corrupt, per_class=4, size=32)
    for path in (corrupt / "train").rglob("*.png"):
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = tmp_path / "good.pth"
    torch.save({"format": "hpm-finetune", "version": 1, "model_name": "vit_tiny_patch4", "next_epoch": 1,
                "model": create_classifier("vit_tiny_patch4", num_classes=10).state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, evil)
    wide = tmp_path / "wide.pth"
    torch.save(create_classifier("vit_tiny_patch4", num_classes=10, embed_dim=96).state_dict(), wide)
    other_model = tmp_path / "other_model.pth"
    torch.save({"format": "hpm-pretrain", "version": 1, "model_name": "mae_vit_base_patch16", "next_epoch": 3,
                "model": {}, "teacher": {}, "args": {}}, other_model)
    mae = tmp_path / "mae.pth"
    torch.save({"model": create_classifier("vit_tiny_patch4", num_classes=10).state_dict(),
                "args": argparse.Namespace(model="mae")}, mae)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return {"data": data, "empty": empty, "listed": listed, "corrupt": corrupt, "good": good, "truncated": truncated,
            "text": text, "evil": evil, "wide": wide, "other_model": other_model, "mae": mae, "blocker": blocker,
            "tmp": tmp_path}


P, F, K = main_pretrain, main_finetune, main_knn
CASES = {
    # id: (script, argv builder, words the message must contain)
    "data_path_missing": (P, lambda f: ["--data_path", str(f["tmp"] / "nope")], ["no such directory", "--data_path"]),
    "empty_dataset": (P, lambda f: ["--data_path", str(f["empty"])], ["train", "expected"]),
    "list_names_missing_files": (P, lambda f: ["--data_path", str(f["listed"])], ["missing.png", "line 2"]),
    "corrupt_jpeg_stops_by_default": (P, lambda f: ["--data_path", str(f["corrupt"]), "--num_workers", "1"],
                                      ["unreadable image", "--bad_images skip"]),
    "unknown_model": (P, lambda f: ["--model", "mae_vit_tiny_patch5"], ["did you mean mae_vit_tiny_patch4"]),
    "unknown_classifier": (F, lambda f: ["--model", "vit_base_patch61"], ["did you mean", "vit_base_patch16"]),
    "input_size_not_divisible": (P, lambda f: ["--input_size", "30"], ["not divisible by the patch size 4"]),
    "batch_larger_than_dataset": (P, lambda f: ["--data_path", str(f["data"]), "--batch_size", "64"],
                                  ["--batch_size 64", "8 training images"]),
    "mask_ratio_zero": (P, lambda f: ["--mask_ratio", "0"], ["--mask_ratio 0.0", "(0, 1)"]),
    "mask_ratio_above_one": (P, lambda f: ["--mask_ratio", "1.2"], ["--mask_ratio 1.2", "(0, 1)"]),
    "accum_iter_zero": (P, lambda f: ["--accum_iter", "0"], ["--accum_iter 0", "at least 1"]),
    "epochs_zero": (F, lambda f: ["--epochs", "0"], ["--epochs 0", "at least 1"]),
    "output_dir_not_writable": (P, lambda f: ["--output_dir", str(f["blocker"] / "sub")],
                                ["--output_dir", "cannot write"]),
    "resume_finetune_checkpoint_into_pretraining": (P, lambda f: ["--resume", str(f["good"])],
                                                    ["hpm-finetune", "not a hpm-pretrain checkpoint"]),
    "resume_other_architecture": (P, lambda f: ["--resume", str(f["other_model"])],
                                  ["mae_vit_base_patch16", "--model"]),
    "resume_truncated_checkpoint": (P, lambda f: ["--resume", str(f["truncated"])], ["not a readable checkpoint"]),
    "resume_not_a_checkpoint": (P, lambda f: ["--resume", str(f["text"])], ["not a readable checkpoint"]),
    "resume_missing_file": (P, lambda f: ["--resume", str(f["tmp"] / "gone.pth")], ["no such file"]),
    "hpm_with_mae_mask_flag": (P, lambda f: ["--mask_regular"], ["--no-learning_loss"]),
    "block_mask_without_square_visible_area": (P, lambda f: ["--no-learning_loss", "--mask_block", "--mask_ratio",
                                                             "0.5"], ["not a square number", "--mask_ratio"]),
    "max_skipped_steps_zero": (P, lambda f: ["--max_skipped_steps", "0"], ["--max_skipped_steps 0", "at least 1"]),
    "finetune_other_architecture": (F, lambda f: ["--finetune", str(f["wide"])], ["does not fit", "shape mismatch"]),
    "finetune_truncated_checkpoint": (F, lambda f: ["--finetune", str(f["truncated"])], ["--finetune", "truncated"]),
    "finetune_malicious_pickle": (F, lambda f: ["--finetune", str(f["evil"])], ["refused to load"]),
    "finetune_not_a_checkpoint": (F, lambda f: ["--finetune", str(f["text"])], ["not a readable checkpoint"]),
    "teacher_from_mae_checkpoint": (F, lambda f: ["--finetune", str(f["mae"]), "--teacher"], ["drop --teacher"]),
    "eval_without_weights": (F, lambda f: ["--eval"], ["--eval needs weights", "--resume"]),
    "knn_features_missing": (K, lambda f: ["--load_features", str(f["tmp"] / "nofeatures")], ["--load_features"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, files, tmp_path, capsys):
    script, build, words = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0, "earlier": "run"}\n')
    (out / "notes.bin").write_bytes(b"\x00precious")
    before = snapshot(out)
    argv = build(files)
    defaults = ["--output_dir", str(out)]
    if script is not K:
        defaults += ["--epochs", "1", "--batch_size", "4"] + ([] if "--num_workers" in argv else ["--num_workers", "0"])
    argv = defaults + argv    # later flags win
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: script.main(script.get_args_parser().parse_args(argv)))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert "payload ran" not in captured.out
    assert unchanged(out, before)
