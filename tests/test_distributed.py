"""Real torchrun (gloo on CPU) and real submitit (its local executor) runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import main_pretrain
from tests.helpers import REPO, run_script
from util.checkpoint import load_file
from util.errors import UserError
from util.launcher import launcher_parser, make_executor, submit

# torchrun of this interpreter (its console script is on PATH only in an activated environment)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_torchrun_pretraining_keeps_ranks_identical(tmp_path):
    out = tmp_path / "out"
    res = _torchrun("tests/dist_worker.py", str(tmp_path), "--epochs", "1", "--batch_size", "32",
                    "--num_workers", "0", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    for part in ("student", "teacher"):
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), f"{part}.{name} differs between ranks"
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["args"]["world_size"] == 2 and ckpt["next_epoch"] == 1
    for name, value in ckpt["teacher"].items():
        assert torch.equal(value, r0["teacher"][name])
    assert "2 process(es)" in res.stdout
    assert res.stdout.count("epoch 0 done") == 1       # only rank 0 logs


@pytest.mark.slow
def test_knn_two_processes_equal_one(tmp_path, pretrained_checkpoint):
    common = ["--finetune", str(pretrained_checkpoint), "--num_workers", "0", "--batch_size", "50",
              "--nb_knn", "10", "20"]
    single = run_script("main_knn.py", *common, "--output_dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    multi = _torchrun("main_knn.py", *common, "--output_dir", str(tmp_path / "two"))
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "log_knn.txt").read_text())
    two = json.loads((tmp_path / "two" / "log_knn.txt").read_text())
    assert one == two


@pytest.mark.slow
def test_submitit_local_job_requeues_on_preemption_and_finishes(tmp_path, monkeypatch):
    """Rank 0 receives submitit's preemption signal (SIGUSR2) at a named step of epoch 1 (fault
    injection: no dependence on start-up time); the job saves, requeues itself and finishes."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HPM_FAULT", f"point=step,at=30,action=SIGUSR2,rank=0,once={tmp_path / 'fired'}")
    out = tmp_path / "out"
    parser = launcher_parser(main_pretrain.get_args_parser(add_help=False), "test")
    args = parser.parse_args([
        "--cluster", "local", "--ngpus", "0", "--ntasks_per_node", "2", "--timeout", "60",
        "--job_dir", str(tmp_path / "jobs" / "%j"), "--output_dir", str(out),
        "--epochs", "3", "--batch_size", "32", "--num_workers", "0", "--print_freq", "2"])
    job = submit("main_pretrain", args)
    job.wait()
    log = job.paths.stdout.read_text()
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == list(range(3)), epochs
    assert load_file(out / "checkpoint-last.pth")["next_epoch"] == 3
    assert "SIGUSR2: saved epoch 1 at step" in log and "resumed from" in log and "at epoch 1, step" in log, log[-2000:]


def _launcher_args(*argv):
    return launcher_parser(main_pretrain.get_args_parser(add_help=False), "test").parse_args(list(argv))


def test_slurm_submission_script_carries_the_cluster_options(tmp_path, monkeypatch):
    """The real submitit SLURM executor, with a stand-in `srun` on PATH so that it can be built here."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    args = _launcher_args("--nodes", "2", "--ngpus", "8", "--partition", "learnfair", "--use_volta32",
                          "--account", "acc", "--qos", "high", "--timeout", "600", "--job_dir", str(tmp_path / "%j"))
    text = make_executor(args, "hpm_main_pretrain")._executor._make_submission_file_text("true", "uid")
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=learnfair",
                 "--constraint=volta32gb", "--account=acc", "--qos=high", "--time=600", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in text


def test_slurm_without_slurm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="--cluster local"):
        make_executor(_launcher_args("--job_dir", str(tmp_path)), "x")


@pytest.mark.slow
def test_a_stuck_rank_ends_the_run_with_a_message_instead_of_a_hang(tmp_path):
    """Rank 1 hangs after its third step (fault injection); rank 0's next collective times out
    after --dist_timeout (0.25 min) and the run ends, naming the rank, instead of waiting forever."""
    env = {**ENV, "HPM_FAULT": "point=step,at=3,action=hang,rank=1"}
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "main_pretrain.py", "--epochs", "1",
           "--batch_size", "16", "--num_workers", "0", "--dist_timeout", "0.25", "--output_dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode != 0
    assert "error: rank 0: a collective operation did not complete within --dist_timeout 0.25 min" in res.stderr, \
        res.stderr[-3000:]


ELASTIC = ["main_pretrain.py", "--epochs", "2", "--batch_size", "32", "--num_workers", "0", "--save_every", "1",
           "--print_freq", "4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = _torchrun(*ELASTIC, "--output_dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(out / "checkpoint-last.pth")


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_is_killed_and_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    """SIGKILL of rank 1 in the middle of epoch 1 (its 30th step); torchrun --max-restarts brings
    both ranks back from checkpoint-last.pth (end of epoch 0) and the run ends bit-identical."""
    env = {**ENV, "HPM_FAULT": f"point=step,at=30,action=SIGKILL,rank=1,once={tmp_path / 'fired'}"}
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts", "1", *ELASTIC,
           "--output_dir", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "fired").exists() and "resumed from" in res.stdout and "at epoch 1" in res.stdout
    _assert_same_weights(uninterrupted, load_file(tmp_path / "out" / "checkpoint-last.pth"))


@pytest.mark.slow
def test_torchrun_stop_mid_epoch_and_resume_restores_every_ranks_rng(tmp_path, uninterrupted):
    """SIGTERM to rank 0 at its 27th step (epoch 1); both ranks save and stop at the next common
    step; the rerun restores each rank's own RNG states and ends bit-identical."""
    out = tmp_path / "out"
    stopped = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *ELASTIC,
                              "--output_dir", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600,
                             env={**ENV, "HPM_FAULT": "point=step,at=27,action=SIGTERM,rank=0"})
    assert stopped.returncode != 0 and "SIGTERM: saved epoch 1 at step" in stopped.stdout, stopped.stderr[-3000:]
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["next_epoch"] == 1 and ckpt["next_step"] > 0 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["generators"][0], ckpt["rng"][1]["generators"][0])
    resumed = _torchrun(*ELASTIC, "--output_dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted, load_file(out / "checkpoint-last.pth"))


def test_scripts_and_the_ablation_import_without_submitit(tmp_path):
    """A machine without submitit (the GPU acceptance machine's image): every script and the
    ablation's --jobs path import; only --cluster asks for it, in one line."""
    blocker = tmp_path / "submitit.py"
    blocker.write_text("raise ImportError('submitit is blocked for this test')\n")
    code = ("import main_ablation, main_pretrain, submitit_pretrain, util.launcher as l, argparse\n"
            "from util.errors import UserError\n"
            "try:\n    l.make_executor(argparse.Namespace(job_dir='x', ntasks_per_node=1, ngpus=0, "
            "cluster='local'), 'n')\n"
            "except UserError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "--cluster needs submitit, which is not installed here: pip install submitit"


@pytest.mark.slow
@pytest.mark.parametrize("model, batch", [("mae_vit_tiny_patch4", "32"), ("videomae_vit_tiny_patch4", "8")])
def test_torchrun_compiled_checkpointed_accumulating_run_keeps_ranks_identical_and_resumes(tmp_path, model, batch):
    """DDP with --compile, --grad_checkpointing and --accum_iter 2 together, images and clips: stopped by
    SIGTERM mid-epoch (the compiled teacher already choosing hard patches: 1 epoch means alpha 0.5 from
    the start), resumed by the same command, the ranks' students and teachers identical at the end."""
    out = tmp_path / "out"
    argv = ["tests/dist_worker.py", str(tmp_path), "--model", model, "--compile", "--grad_checkpointing",
            "--accum_iter", "2", "--epochs", "1", "--batch_size", batch, "--num_workers", "0", "--print_freq", "4",
            "--output_dir", str(out)]
    stopped = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *argv], capture_output=True, text=True,
                             cwd=REPO, timeout=900, env={**ENV, "HPM_FAULT": "point=step,at=9,action=SIGTERM,rank=0"})
    assert stopped.returncode != 0 and "SIGTERM: saved epoch 0 at step" in stopped.stdout, stopped.stderr[-3000:]
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["next_epoch"] == 0 and ckpt["next_step"] % 2 == 0 and len(ckpt["rng"]) == 2
    resumed = _torchrun(*argv)
    assert resumed.returncode == 0 and "at epoch 0, step" in resumed.stdout, resumed.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    for part in ("student", "teacher"):
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), f"{part}.{name} differs between ranks"
    final = load_file(out / "checkpoint-last.pth")
    assert final["next_epoch"] == 1 and all(torch.equal(v, r0["teacher"][k]) for k, v in final["teacher"].items())
