"""The first real run: defaults that follow the data (the built-in demo's vs the paper's recipe on a
--data_path), and auto-resume that continues only the same run, refusing anything else in one line
without touching the output folder."""
import argparse
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from engine_pretrain import PRETRAIN_DEFAULTS, check_pretrain_args
from tests.helpers import REPO, make_image_folder, run_script
from util.args import describe_run, resolve_data_defaults
from util.checkpoint import save_atomic
from util.errors import UserError

IMAGE, VIDEO = "mae_vit_tiny_patch4", "videomae_vit_tiny_patch4"
PAPER_PRETRAIN = {"blr": 1.5e-4, "epochs": 200, "warmup_epochs": 40, "weight_decay": 0.05, "clip_grad": 5.0,
                  "norm_pix_loss": False}
VIDEOMAE_PRETRAIN = {"blr": 1.5e-4, "epochs": 800, "warmup_epochs": 40, "weight_decay": 0.05, "clip_grad": 0.0,
                     "norm_pix_loss": True}
BUILT_IN_PRETRAIN = {"blr": 1.5e-3, "epochs": 40, "warmup_epochs": 5, "weight_decay": 0.05, "clip_grad": 5.0,
                     "norm_pix_loss": False}


def values(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names}


@pytest.mark.parametrize("model, data_path, expected", [
    (IMAGE, None, BUILT_IN_PRETRAIN), (VIDEO, None, BUILT_IN_PRETRAIN),
    (IMAGE, "/data/imagenet", PAPER_PRETRAIN), (VIDEO, "/data/k400", VIDEOMAE_PRETRAIN),
])
def test_pretraining_defaults_follow_the_data(model, data_path, expected):
    argv = ["--model", model] + (["--data_path", data_path] if data_path else [])
    args = main_pretrain.get_args_parser().parse_args(argv)
    filled = check_pretrain_args(args)
    assert values(args, expected) == expected
    assert "--blr " + ("0.0015" if data_path is None else "0.00015") in filled


@pytest.mark.parametrize("data_path", [None, "/data/imagenet"])
def test_explicit_flags_always_win(data_path):
    explicit = ["--blr", "3e-4", "--epochs", "7", "--warmup_epochs", "1", "--clip_grad", "0", "--norm_pix_loss"]
    args = main_pretrain.get_args_parser().parse_args(explicit + (["--data_path", data_path] if data_path else []))
    filled = check_pretrain_args(args)
    assert values(args, ["blr", "epochs", "warmup_epochs", "clip_grad", "norm_pix_loss"]) == {
        "blr": 3e-4, "epochs": 7, "warmup_epochs": 1, "clip_grad": 0.0, "norm_pix_loss": True}
    assert filled == []
    for script, flags in ((main_finetune, ["--blr", "1e-4", "--mixup", "0", "--layer_decay", "0.5", "--aa", "x"]),
                          (main_linprobe, ["--blr", "1", "--batch_size", "8", "--epochs", "3", "--hflip", "0.2"])):
        args = script.get_args_parser().parse_args(flags + (["--data_path", data_path] if data_path else []))
        table = script.FINETUNE_DEFAULTS if script is main_finetune else script.LINPROBE_DEFAULTS
        resolve_data_defaults(args, table, video=False)
        for flag, value in zip(flags[::2], flags[1::2]):
            assert str(getattr(args, flag[2:])) in (value, str(float(value)) if value[0].isdigit() else value)


FINETUNE_EXPECTED = {
    ("image", False): {"blr": 2e-3, "epochs": 30, "warmup_epochs": 2, "layer_decay": 0.75, "mixup": 0.0, "cutmix": 0.0,
                       "aa": "rand-m9-mstd0.5-inc1", "crop_scale": [0.5, 1.0], "hflip": 0.0},
    ("image", True): {"blr": 5e-4, "epochs": 100, "warmup_epochs": 5, "layer_decay": 0.8, "mixup": 0.8, "cutmix": 1.0,
                      "aa": "rand-m9-mstd0.5-inc1", "crop_scale": [0.08, 1.0], "hflip": 0.5},
    ("clips", False): {"blr": 2e-3, "epochs": 30, "warmup_epochs": 2, "layer_decay": 0.75, "mixup": 0.0, "cutmix": 0.0,
                       "aa": "", "crop_scale": [0.5, 1.0], "hflip": 0.0},
    ("clips", True): {"blr": 1e-3, "epochs": 100, "warmup_epochs": 5, "layer_decay": 0.75, "mixup": 0.8,
                      "cutmix": 1.0, "aa": "rand-m7-n4-mstd0.5-inc1", "crop_scale": [0.08, 1.0], "hflip": 0.5},
}
LINPROBE_EXPECTED = {
    False: {"blr": 50.0, "epochs": 20, "warmup_epochs": 2, "batch_size": 256, "weight_decay": 0.0,
            "crop_scale": [0.5, 1.0], "hflip": 0.0},
    True: {"blr": 0.1, "epochs": 90, "warmup_epochs": 10, "batch_size": 512, "weight_decay": 0.0,
           "crop_scale": [0.08, 1.0], "hflip": 0.5},
}


@pytest.mark.parametrize("kind", ["image", "clips"])
@pytest.mark.parametrize("on_data", [False, True])
def test_classifier_defaults_follow_the_data(kind, on_data):
    video = kind == "clips"
    argv = ["--model", "video_vit_tiny_patch4" if video else "vit_tiny_patch4"]
    argv += ["--data_path", "/data/x"] if on_data else []
    args = main_finetune.get_args_parser().parse_args(argv)
    resolve_data_defaults(args, main_finetune.FINETUNE_DEFAULTS, video)
    expected = FINETUNE_EXPECTED[kind, on_data]
    assert values(args, expected) == expected
    args = main_linprobe.get_args_parser().parse_args(argv)
    resolve_data_defaults(args, main_linprobe.LINPROBE_DEFAULTS, video)
    assert values(args, LINPROBE_EXPECTED[on_data]) == LINPROBE_EXPECTED[on_data]


def test_help_shows_both_values_of_every_data_dependent_flag():
    for script, table in ((main_pretrain, PRETRAIN_DEFAULTS), (main_finetune, main_finetune.FINETUNE_DEFAULTS),
                          (main_linprobe, main_linprobe.LINPROBE_DEFAULTS)):
        parser = script.get_args_parser()
        text = "".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest in table:
                assert action.default is None
                assert "on the built-in data" in action.help and "on a --data_path" in action.help
                assert "".join(action.help.split()) in text, (script.__name__, action.dest)
    assert "0: no clipping" in main_finetune.get_args_parser().format_help()


def test_start_line_says_how_the_run_is_made_up():
    args = main_pretrain.get_args_parser().parse_args(["--data_path", "/data/imagenet", "--batch_size", "32",
                                                       "--accum_iter", "8"])
    filled = check_pretrain_args(args)
    args.num_workers, args.lr = 10, 1.5e-4 * 2048 / 256
    line = describe_run(args, 8, "bf16", filled, lr_given=False)
    for part in ("8 process(es) x 32 per process x 8 accumulation = effective batch 2048",
                 "lr 0.0012 = blr 0.00015 x 2048 / 256", "epochs 200, warm-up 40", "precision bf16",
                 "10 loader worker(s)", "defaults for a --data_path: --blr 0.00015 --epochs 200 --warmup_epochs 40"):
        assert part in line, part
    knn = main_knn.get_args_parser().parse_args([])
    knn.num_workers = 2
    assert "no data-dependent defaults" in describe_run(knn, 1, "fp32", [])


# --- a run continues only itself -------------------------------------------------------------------

RUN = ["--epochs", "1", "--batch_size", "64", "--num_workers", "0", "--print_freq", "50"]


def pretrain(out, *extra: str):
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args([*RUN, "--output_dir", str(out), *extra]))


def folder_state(directory) -> dict:
    """Every file under `directory` (tensorboard events included) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_pretraining(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_run") / "out"
    pretrain(out)
    return out


@pytest.mark.parametrize("change, named", [
    (["--blr", "1e-3"], "--blr 0.0015 there, 0.001 now"),
    (["--no-learning_loss"], "--learning_loss on there, off now"),
    (["--mask_ratio", "0.6"], "--mask_ratio 0.75 there, 0.6 now"),
    (["--model", "mae_vit_small_patch16", "--input_size", "32"], "--model mae_vit_tiny_patch4 there"),
    (["--seed", "1"], "--seed 0 there, 1 now"),
    (["--batch_size", "32"], "the effective batch 64 there, 32 now"),
    ("data", "--data_path unset there"),
])
def test_auto_resume_refuses_another_run_untouched(finished_pretraining, tmp_path, change, named):
    if change == "data":
        make_image_folder(tmp_path / "data", per_class=40, size=32)
        change = ["--data_path", str(tmp_path / "data"), "--epochs", "1", "--warmup_epochs", "0"]
    before = folder_state(finished_pretraining)
    with pytest.raises(UserError) as caught:
        pretrain(finished_pretraining, *change)
    message = str(caught.value)
    assert "\n" not in message and named in message
    assert f"--output_dir {finished_pretraining}" in message and "--resume" in message
    assert "another --output_dir" in message
    assert folder_state(finished_pretraining) == before


@pytest.mark.parametrize("script", [main_finetune, main_linprobe])
def test_auto_resume_refuses_another_scripts_run(finished_pretraining, script):
    before = folder_state(finished_pretraining)
    argv = ["--epochs", "1", "--num_workers", "0", "--output_dir", str(finished_pretraining),
            "--finetune", str(finished_pretraining / "checkpoint-last.pth")]
    with pytest.raises(UserError, match=r"holds a run of main_pretrain.py \(checkpoint-last.pth\), not of "
                                        rf"{script.__name__}.py: pass another --output_dir"):
        script.main(script.get_args_parser().parse_args(argv))
    assert folder_state(finished_pretraining) == before


def test_finished_run_exits_untouched(finished_pretraining, capsys):
    before = folder_state(finished_pretraining)
    assert pretrain(finished_pretraining, "--num_workers", "2", "--print_freq", "3") is None
    assert "has finished all 1 epochs of this run: nothing to do" in capsys.readouterr().out   # the log is stdout
    assert folder_state(finished_pretraining) == before


def test_restart_with_more_epochs_or_another_split_of_the_batch_continues(tmp_path):
    out = tmp_path / "out"
    pretrain(out)
    pretrain(out, "--epochs", "2", "--batch_size", "32", "--accum_iter", "2", "--save_every", "5")
    log_lines = (out / "log.txt").read_text().splitlines()
    assert [eval(line.replace("null", "None").replace("true", "True").replace("false", "False"))["epoch"]
            for line in log_lines] == [0, 1]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["next_epoch"] == 2


def test_resume_on_purpose_continues_with_a_warning(tmp_path, capsys):
    out = tmp_path / "out"
    pretrain(out)
    pretrain(out, "--epochs", "2", "--blr", "1e-3", "--resume", str(out / "checkpoint-last.pth"))
    assert "continuing on purpose with other settings than the run that wrote it (--blr 0.0015 there, 0.001 now)" \
        in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["next_epoch"] == 2 and ckpt["settings"]["blr"] == 1e-3


def test_checkpoints_without_saved_settings_still_resume_and_are_still_checked(tmp_path):
    out = tmp_path / "out"
    pretrain(out)
    path = out / "checkpoint-last.pth"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["settings"]   # as written before settings were saved: only the (rewritten) args
    save_atomic(ckpt, path)
    with pytest.raises(UserError, match="--blr 0.0015 there, 0.001 now"):
        pretrain(out, "--epochs", "2", "--blr", "1e-3")
    pretrain(out, "--epochs", "2")
    assert torch.load(path, weights_only=True)["next_epoch"] == 2


def test_finished_classifier_run_exits_zero_untouched(pretrained_checkpoint, tmp_path):
    out = tmp_path / "lp"
    argv = ["--finetune", str(pretrained_checkpoint), "--epochs", "1", "--num_workers", "0", "--output_dir", str(out)]
    first = run_script("main_linprobe.py", *argv)
    assert first.returncode == 0, first.stderr
    before = folder_state(out)
    again = run_script("main_linprobe.py", *argv)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout + again.stderr
    assert folder_state(out) == before
    other = run_script("main_linprobe.py", *argv, "--optimizer", "sgd")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [f"error: --output_dir {out} holds another run (checkpoint-last.pth: "
                                                 f"--optimizer lars there, sgd now): pass another --output_dir for a "
                                                 f"new run, or --resume {out / 'checkpoint-last.pth'} to continue "
                                                 f"that one on purpose with these settings"]
    assert folder_state(out) == before


# --- README's sequences, in order, in one copy of the repository ----------------------------------

def readme_sequence(name: str) -> list[list[str]]:
    """The commands of README's `<!-- sequence: name -->` block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- sequence: {name} -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_sequences_run_in_order_in_one_clone(tmp_path):
    """README's image sequence, then its video sequence, in one clone, one epoch each: no command may stop
    (before, the second pretraining met the first one's checkpoint, and fine-tuning auto-resumed it)."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "output*",
                                                               ".venv", "venv", "results"))
    training = {"main_pretrain.py", "main_finetune.py", "main_linprobe.py"}
    commands = readme_sequence("images") + readme_sequence("video")
    assert [c[1] for c in commands[:2]] == ["main_pretrain.py", "main_knn.py"] and len(commands) >= 8
    for command in commands:
        assert command[0] == "python"
        argv = [sys.executable, *command[1:]] + (["--epochs", "1"] if command[1] in training else [])
        done = subprocess.run(argv, cwd=clone, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        assert done.returncode == 0, f"{shlex.join(command)} stopped: {done.stderr.strip()[-500:]}"
    assert (clone / "fig.png").is_file() and (clone / "hpm_timm" / "config.json").is_file()
    assert (clone / "output_video_finetune" / "checkpoint-last.pth").is_file()
