"""main_ablation.py (variants x seeds, evaluated alike, mean ± std) and the step-unit teacher schedule."""
import json
import math
import re
import statistics

import pytest
import torch
from PIL import Image

import main_ablation
import models_hpm
from engine_pretrain import check_pretrain_args, pretrain_args_parser, teacher_schedule
from models_hpm import HPMTeacher
from tests.helpers import make_image_folder, run_script
from util.ablation import mean_std, summarize
from util.args import namespace_to_argv
from util.errors import UserError
from util.schedules import ema_half_life, teacher_decay, teacher_decay_per_step

# ---- the step-unit teacher schedule ----------------------------------------------------------------

@pytest.mark.parametrize("steps_per_epoch", [693, 1250, 40, 3])
def test_step_unit_decay_has_a_half_life_of_one_epoch_at_the_start(steps_per_epoch):
    decay = teacher_decay_per_step(0, steps_per_epoch)
    assert decay ** steps_per_epoch == pytest.approx(0.5, rel=1e-9)
    assert ema_half_life(decay) == pytest.approx(steps_per_epoch, rel=1e-9)


def test_step_unit_decay_keeps_the_reference_shape():
    # with the reference's own half-life (693.1 steps) the schedule is the reference's, epoch by epoch
    half_life = ema_half_life(0.999) / 693
    for epoch in (0, 10, 50, 99, 100, 400):
        assert teacher_decay_per_step(epoch, 693, half_life) == pytest.approx(teacher_decay(epoch), abs=1e-12)
    # the half-life grows 10x over the first 100 epochs, whatever the epoch's length
    for steps in (40, 625):
        growth = ema_half_life(teacher_decay_per_step(100, steps)) / ema_half_life(teacher_decay_per_step(0, steps))
        assert growth == pytest.approx(math.log(0.999) / math.log(0.9999), rel=1e-9)
        assert teacher_decay_per_step(200, steps) == teacher_decay_per_step(100, steps)
    assert teacher_decay_per_step(0, 40, half_life_epochs=2.0) == pytest.approx(0.5 ** (1 / 80))
    with pytest.raises(ValueError):
        teacher_decay_per_step(0, 0)


def _tracking_error(schedule, epochs: int, steps_per_epoch: int) -> tuple[float, float]:
    """Teacher and student start equal; the student then jumps to trained weights and stays. Returns
    the teacher's remaining distance (relative to the jump) after every step of `epochs` epochs, and
    what the product of the schedule's decays predicts."""
    torch.manual_seed(0)
    student = models_hpm.create_pretrain_model("mae_vit_tiny_patch4")
    teacher = HPMTeacher(student, epochs, decay_schedule=schedule)
    start = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    trained = torch.cat([p.detach().flatten() for p in student.parameters()])
    expected = 1.0
    for step in range(epochs * steps_per_epoch):
        teacher.update(step // steps_per_epoch)
        expected *= teacher.decay(step // steps_per_epoch)
    now = torch.cat([p.flatten() for p in teacher.model.parameters()])
    return float((now - trained).norm() / (start - trained).norm()), expected


def test_step_unit_teacher_tracks_the_student_on_a_short_run():
    # a 20-epoch run of 40 steps per epoch (the size of the small runs)
    args = pretrain_args_parser().parse_args(["--teacher_decay_unit", "step"])
    step_gap, step_expected = _tracking_error(teacher_schedule(args, 40), 20, 40)
    ref_gap, ref_expected = _tracking_error(teacher_decay, 20, 40)
    assert step_gap == pytest.approx(step_expected, rel=1e-3, abs=1e-6) and step_gap < 1e-4
    assert ref_gap == pytest.approx(ref_expected, rel=1e-3) and ref_gap > 0.4   # still ~45% of the start


def test_teacher_schedule_flags():
    parser = pretrain_args_parser()
    assert teacher_schedule(parser.parse_args([]), 40) is teacher_decay
    half = teacher_schedule(parser.parse_args(["--teacher_decay_unit", "step", "--teacher_half_life", "0.5"]), 40)
    assert half(0) == pytest.approx(0.5 ** (1 / 20))
    for argv, words in ((["--teacher_half_life", "2"], "--teacher_decay_unit step"),
                        (["--teacher_decay_unit", "step", "--no-learning_loss"], "no teacher"),
                        (["--teacher_decay_unit", "step", "--teacher_half_life", "0"], "must be positive")):
        with pytest.raises(UserError, match=words):
            check_pretrain_args(parser.parse_args(argv))
    check_pretrain_args(parser.parse_args(["--teacher_decay_unit", "step", "--no-learning_loss", "--target", "ema"]))


# ---- statistics and commands ------------------------------------------------------------------------

def test_mean_std_and_paired_differences():
    three = mean_std([1.0, 2.0, 3.0])
    assert three.keys() == {"n", "mean", "std", "t", "values"}
    assert three["n"] == 3 and three["values"] == [1.0, 2.0, 3.0]
    assert (three["mean"], three["std"], three["t"]) == pytest.approx((2.0, 1.0, 2 * math.sqrt(3)))
    one = mean_std([5.0])
    assert one["std"] is None and one["t"] is None
    runs = [{"variant": v, "seed": s, "metrics": {"knn": k, "probe": p, "knn_teacher": None, "probe_teacher": None,
                                                  "recon": 0.5}}
            for v, s, k, p in (("mae", 0, 50.0, 40.0), ("mae", 1, 52.0, 41.0), ("mae", 2, 54.0, 45.0),
                               ("hpm", 0, 51.0, 42.0), ("hpm", 1, 55.0, 41.0))]
    summary = summarize(runs, ["mae", "hpm"], "mae")
    assert summary["hpm"]["seeds"] == [0, 1]
    assert summary["hpm"]["knn"]["mean"] == pytest.approx(53.0)
    assert summary["hpm"]["diff_knn"]["values"] == [1.0, 3.0]         # seed 2 has no pair
    assert summary["hpm"]["diff_probe"]["std"] == pytest.approx(statistics.stdev([2.0, 0.0]))
    assert summary["hpm"]["knn_teacher"] is None and "diff_knn" not in summary["mae"]


def test_each_pretraining_model_names_its_classifier():
    """Images and clips alike: the classifier has the pretrained encoder's keys and shapes."""
    import models_vit
    from util.checkpoint import clean_state_dict
    for name in models_hpm.PRETRAIN_MODELS.names():
        classifier = models_hpm.encoder_name(name)
        assert classifier in models_vit.CLASSIFIERS.names(), name
        assert models_vit.is_video_classifier(classifier) == models_hpm.is_video_model(name), name
    for name in ("mae_vit_tiny_patch4", "videomae_vit_tiny_patch4", "videomae_vit_small_patch16"):
        encoder = clean_state_dict(models_hpm.create_pretrain_model(name).state_dict())
        own = models_vit.create_classifier(models_hpm.encoder_name(name), global_pool=False, num_classes=0).state_dict()
        assert {k: tuple(v.shape) for k, v in encoder.items()} == {k: tuple(v.shape) for k, v in own.items()}, name


def test_the_video_variants_evaluate_video_encoders_on_their_clips(tmp_path):
    import main_ablation
    args = main_ablation.get_args_parser().parse_args(
        ["--model", "videomae_vit_tiny_patch4", "--variants", "videomae", "hpm_tube", "hpm_token", "--seeds", "0",
         "--num_frames", "8", "--output_dir", str(tmp_path)])
    runs = main_ablation.plan_runs(args, main_ablation.parse_variants(args), tmp_path)
    assert [r.variant for r in runs] == ["videomae", "hpm_tube", "hpm_token"]
    for run in runs:
        pretrain = run.stages[0].argv
        assert "--model" in pretrain and "videomae_vit_tiny_patch4" in pretrain
        for stage in run.stages[1:]:
            argv = stage.argv
            assert argv[argv.index("--model") + 1] == "video_vit_tiny_patch4"
            assert argv[argv.index("--num_frames") + 1] == "8"
    assert [s.name for s in runs[0].stages] == ["pretrain", "knn_student", "linprobe_student"]
    assert "--mask_unit" in runs[2].stages[0].argv and "token" in runs[2].stages[0].argv
    assert len(runs[1].stages) == 5   # HPM: the teacher evaluated too


def test_namespace_to_argv_round_trips():
    parser = pretrain_args_parser()
    for argv in ([], ["--no-learning_loss", "--norm_pix_loss", "--mean", "0.5", "0.4", "0.3", "--std", "1", "1", "1"],
                 ["--blr", "0.00025", "--epochs", "3", "--no-pin_mem", "--teacher_decay_unit", "step"]):
        args = parser.parse_args(argv)
        canonical = namespace_to_argv(parser, args)
        assert parser.parse_args(canonical) == args
        assert namespace_to_argv(parser, parser.parse_args(canonical)) == canonical
    parser = main_ablation.get_args_parser()
    args = parser.parse_args(["--variant", "a=--blr 1", "--variant", "b=", "--seeds", "3", "4", "--cluster", "local"])
    assert parser.parse_args(namespace_to_argv(parser, args)) == args


@pytest.mark.parametrize("argv, words", [
    (["--variants", "hpm", "nope"], "--variants nope"),
    (["--variant", "no flags"], "NAME="),
    (["--variant", "mae=--blr 1"], "already runs"),
    (["--variant", "broken=--mask_block"], "variant broken"),
    (["--variant", "typo=--mask_ration 0.5"], "variant typo"),
    (["--seed", "3"], "--seed"),
    (["--seeds", "1", "1"], "each seed once"),
    (["--variant", "seeded=--seed 4"], "variant seeded: --seed"),
    (["--resume", "x.pth"], "--resume"),
    (["--baseline", "hpm_abs"], "--baseline hpm_abs"),
    (["--cluster", "local", "--nodes", "2"], "--nodes 1"),
])
def test_bad_ablation_flags_fail_before_running(tmp_path, argv, words):
    args = main_ablation.get_args_parser().parse_args(argv + ["--output_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match=words):
        main_ablation.main(args)
    assert not (tmp_path / "out").exists()


# ---- end to end ---------------------------------------------------------------------------------------

def _files(directory):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


def _last(path):
    return json.loads(path.read_text().splitlines()[-1])


@pytest.mark.slow
def test_ablation_end_to_end_resumes_and_reports_what_the_runs_logged(tmp_path):
    data, out = tmp_path / "data", tmp_path / "ablation"
    make_image_folder(data, classes=2, per_class=12, split="train")
    make_image_folder(data, classes=2, per_class=4, split="val")
    common = ["--data_path", str(data), "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
              "--knn_k", "5", "--probe_epochs", "1", "--probe_batch_size", "8", "--output_dir", str(out),
              "--variants", "mae", "--variant", "hpm_step=--teacher_decay_unit step --teacher_half_life 0.5"]

    # seed 0 here, two runs at once; one pretraining is stopped (SIGTERM) at its second step
    stop = f"point=step,at=2,action=SIGTERM,once={tmp_path / 'stopped'}"
    first = run_script("main_ablation.py", *common, "--seeds", "0", "--jobs", "2", env={"HPM_FAULT": stop})
    assert first.returncode == 2 and "1 run(s) failed" in first.stderr, first.stderr + first.stdout
    assert "pretrain did not finish (exit status 75" in first.stderr
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1   # the other run is reported
    stopped = next(v for v in ("mae", "hpm_step") if f"{v}/seed_0: pretrain" in first.stderr)

    # seed 1 added, one submitit job per run (local executor): the stopped run resumes mid-epoch, and
    # one job is preempted (submitit's SIGUSR2 to the job at a pretraining step): its run saves
    # mid-epoch, the job is requeued and resumes
    preempt = f"point=step,at=2,action=SIGUSR2,to=parent,once={tmp_path / 'preempted'}"
    second = run_script("main_ablation.py", *common, "--seeds", "0", "1", "--cluster", "local", "--ngpus", "0",
                        "--cpus_per_task", "1", "--job_dir", str(tmp_path / "jobs"), env={"HPM_FAULT": preempt})
    assert second.returncode == 0, second.stderr + second.stdout
    assert "1 finished, 3 to run" in second.stdout and "job " in second.stdout
    assert "at epoch 0, step 2" in (out / stopped / "seed_0" / "logs" / "pretrain.log").read_text()
    assert (tmp_path / "preempted").exists()
    # two mid-epoch resumes in all: the first call's stop, and the preempted job's (in whichever
    # run's pretraining or probe reached its process's second step first)
    logs = "".join(p.read_text() for p in out.glob("*/seed_*/logs/*.log"))
    assert len(re.findall(r"resumed from \S+ at epoch 0, step [12]\n", logs)) == 2

    # a third call trains and evaluates nothing: every file of every run stays as it was
    runs = {(v, s): out / v / f"seed_{s}" for v in ("mae", "hpm_step") for s in (0, 1)}
    before = {key: _files(path) for key, path in runs.items()}
    third = run_script("main_ablation.py", *common, "--seeds", "0", "1")
    assert third.returncode == 0, third.stderr + third.stdout
    assert "4 finished, 0 to run" in third.stdout
    assert all(_files(path) == before[key] for key, path in runs.items())

    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "mae" and results["evaluation"]["amp"] == "none"
    assert len(results["runs"]) == 4 and all(len(r["commands"]) in (3, 5) for r in results["runs"])
    logged = {}
    for (variant, seed), path in runs.items():
        logged[variant, seed] = {"knn": _last(path / "knn_student" / "log_knn.txt")["k5_acc1"],
                                 "probe": _last(path / "linprobe_student" / "log.txt")["test_acc1"],
                                 "recon": _last(path / "log.txt")["train_recon"]}
        if variant == "hpm_step":
            logged[variant, seed]["knn_teacher"] = _last(path / "knn_teacher" / "log_knn.txt")["k5_acc1"]
            # the step-unit schedule ran and was logged: 3 steps per epoch, half-life 0.5 epoch
            assert _last(path / "log.txt")["train_teacher_decay"] == pytest.approx(0.5 ** (1 / 1.5))
        else:
            assert not (path / "knn_teacher").exists()
    table = (out / "results.md").read_text()
    for variant in ("mae", "hpm_step"):
        entry = results["summary"][variant]
        for metric in ("knn", "probe", "recon") + (("knn_teacher",) if variant == "hpm_step" else ()):
            values = [logged[variant, s][metric] for s in (0, 1)]
            assert entry[metric]["mean"] == pytest.approx(statistics.mean(values))
            assert entry[metric]["std"] == pytest.approx(statistics.stdev(values))
        assert f"{entry['knn']['mean']:.2f} ± {entry['knn']['std']:.2f}" in table
        assert f"{entry['probe']['mean']:.2f} ± {entry['probe']['std']:.2f}" in table
    diffs = [logged["hpm_step", s]["knn"] - logged["mae", s]["knn"] for s in (0, 1)]
    assert results["summary"]["hpm_step"]["diff_knn"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert results["summary"]["hpm_step"]["diff_knn"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert "| mae | `--no-learning_loss` | 2 |" in table and "baseline" in table

    with Image.open(out / "results.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 600

    # the same folder with other pretraining settings is refused, and nothing is touched
    changed = main_ablation.get_args_parser().parse_args([*common, "--seeds", "0", "1", "--mask_ratio", "0.6"])
    with pytest.raises(UserError, match=r"other settings \(pretrain mask_ratio\)"):
        main_ablation.main(changed)
    assert all(_files(path) == before[key] for key, path in runs.items())
