"""Ablations with error bars: pretraining variants x seeds, every encoder evaluated the same way, and
each variant's mean ± std and paired difference to a baseline.

`python main_ablation.py` compares HPM with MAE over 3 seeds on the built-in digits (tiny preset).
Each run is main_pretrain.py, then main_knn.py and main_linprobe.py on its student (and, where
there is one, its EMA teacher): one process per run calls the scripts' mains in turn, and the
equivalent command of each goes into results.json. Every main_pretrain.py flag given here passes
through to every run. Rerunning the same command does only what is missing: finished runs are
kept, interrupted ones resume.

Layout: OUTPUT_DIR/<variant>/seed_<s>/ (pretraining), .../knn_{student,teacher}/,
.../linprobe_{student,teacher}/, .../logs/<stage>.log, .../run.json; OUTPUT_DIR/results.{json,md,png}.
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import models_vit
from engine_pretrain import check_pretrain_args, has_teacher, pretrain_args_parser
from models_hpm import encoder_name, is_video_model
from util.ablation import METRICS, draw_figure, markdown_table, summarize
from util.args import HelpFormatter, check_output_dir, legacy_settings, namespace_to_argv
from util.checkpoint import write_bytes_atomic
from util.errors import EXIT_USER_ERROR, UserError, one_line, run_cli
from util.launcher import cluster_parser, import_submitit, make_executor
from util.logger import setup_logging

log = logging.getLogger("hpm")
REPO = Path(__file__).resolve().parent
RESULTS_VERSION = 1

BUILTIN_VARIANTS = {
    "hpm": "",
    "mae": "--no-learning_loss",
    "hpm_abs": "--no-relative",
    "hpm_step": "--teacher_decay_unit step",
    # clips (with a videomae_* --model): VideoMAE, and HPM choosing hard tubes or hard tokens
    "videomae": "--no-learning_loss",
    "hpm_tube": "--mask_unit tube",
    "hpm_token": "--mask_unit token",
}
BASELINES = ("mae", "videomae")   # the default baseline: the first of these that runs
# Set by the ablation for each run, so not passed through.
PER_RUN_DESTS = ("output_dir", "seed", "resume", "auto_resume", "log_dir", "experiment", "start_epoch")
# Where and how a run is executed rather than what it computes: may change between calls.
RUNTIME_DESTS = ("output_dir", "device", "num_workers", "pin_mem", "dist_url", "dist_timeout", "deterministic",
                 "print_freq", "save_retry", "max_skipped_steps", "bad_images", "video_decoder", "grad_checkpointing")
STAGES_ENTRY = "--run-stages-of-one-run"   # internal: see execute()
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def ablation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("ablation")
    g.add_argument("--variants", nargs="*", default=["hpm", "mae"], metavar="NAME",
                   help="built-in variants to run: " + ", ".join(f"{name} ({flags or 'the defaults'})"
                                                                 for name, flags in BUILTIN_VARIANTS.items()))
    g.add_argument("--variant", action="append", default=[], metavar='NAME="--flags ..."',
                   help="add a variant of your own: main_pretrain.py flags on top of the common ones (repeatable)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds; each variant runs each")
    g.add_argument("--baseline", type=str, default=None,
                   help="the variant the others are compared with, seed by seed (default: mae or videomae if it "
                        "runs, else the first variant)")
    g.add_argument("--jobs", type=int, default=1,
                   help="runs at once on this machine (without --cluster), spread over its GPUs if it has any")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each run (default: this machine's cores / --jobs; with --cluster: "
                        "--cpus_per_task)")
    g = p.add_argument_group("evaluation (the same for every run: fp32, fixed seed)")
    g.add_argument("--eval_model", type=str, default=None,
                   help="classifier the encoder is loaded into (default: the one matching --model, e.g. "
                        "vit_base_patch16 for mae_vit_base_patch16)")
    g.add_argument("--knn_k", type=int, default=20, help="neighbours of the kNN classifier")
    g.add_argument("--probe_epochs", type=int, default=10, help="linear-probe epochs")
    g.add_argument("--probe_batch_size", type=int, default=64, help="linear-probe batch size")
    g.add_argument("--probe_blr", type=float, default=0.1, help="linear-probe base learning rate (per 256 images)")
    g.add_argument("--probe_optimizer", choices=["lars", "sgd"], default="sgd",
                   help="linear-probe optimizer (LARS is MAE's ImageNet protocol; SGD learns faster on small data)")
    g.add_argument("--eval_seed", type=int, default=0, help="seed of every evaluation")
    return p


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [pretrain_args_parser(add_help=False), ablation_parser(), cluster_parser(ngpus=1, cluster=None)]
    p = argparse.ArgumentParser(description="Ablation: pretraining variants x seeds, evaluated alike, mean ± std",
                                parents=parents, add_help=add_help, formatter_class=HelpFormatter,
                                epilog="Every main_pretrain.py flag above passes through to each run, except "
                                       "--seed, --resume, --auto_resume, --log_dir, --experiment and --start_epoch, "
                                       "which the ablation sets per run.")
    output_dir = next(a for a in p._actions if a.dest == "output_dir")
    output_dir.default, output_dir.help = "./output_ablation", "<variant>/seed_<s>/ for each run, and the results"
    return p


def raising_parser(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """`parser`, but a parse error raises a one-line UserError naming `what`."""
    def error(message: str):
        raise UserError(f"{what}: {message}")
    parser.error = error
    return parser


@dataclass
class Stage:
    """One script run of a run: its command and how to tell it finished."""
    name: str
    script: str
    argv: list[str]
    log_file: Path                    # the JSON-lines log the script appends to
    final_epoch: int | None = None    # the last record's epoch when finished (None: any record)

    @property
    def command(self) -> str:
        return shlex.join(["python", self.script, *self.argv])

    def records(self) -> list[dict]:
        if not self.log_file.is_file():
            return []
        records = []
        for line in self.log_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a crash: that epoch reruns
                continue
        return records

    def done(self) -> bool:
        records = self.records()
        return bool(records) and (self.final_epoch is None or records[-1].get("epoch") == self.final_epoch)


@dataclass
class PlannedRun:
    variant: str
    seed: int
    directory: Path
    identity: dict                    # what the run computes; a later call must ask for the same
    stages: list[Stage] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.variant}/seed_{self.seed}"

    def pending(self) -> list[Stage]:
        return [s for s in self.stages if not s.done()]


def parse_variants(args: argparse.Namespace) -> dict[str, str]:
    """Variant name -> its main_pretrain.py flags, in the order given."""
    variants: dict[str, str] = {}
    for name in args.variants:
        if name not in BUILTIN_VARIANTS:
            raise UserError(f"--variants {name}: not a built-in variant ({', '.join(BUILTIN_VARIANTS)}); define it "
                            f"with --variant {name}=\"--flags ...\"")
        variants[name] = BUILTIN_VARIANTS[name]
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not VARIANT_NAME.fullmatch(name):
            raise UserError(f"--variant {spec!r}: write NAME=\"--flags ...\" with a NAME of letters, digits, _ . -")
        if name in variants:
            raise UserError(f"--variant {name}: a variant of that name already runs; choose another name")
        variants[name] = flags.strip()
    if not variants:
        raise UserError("no variants: name some with --variants or --variant NAME=\"--flags\"")
    return variants


def pretrain_base(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The main_pretrain.py settings every run shares, from the flags that passed through."""
    base = argparse.Namespace()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            setattr(base, action.dest, getattr(args, action.dest))
    for dest in PER_RUN_DESTS:
        action = next(a for a in parser._actions if a.dest == dest)
        if dest != "output_dir" and getattr(base, dest) != action.default:
            raise UserError(f"{action.option_strings[0]}: the ablation sets it for each run (seeds come from "
                            f"--seeds, outputs go to --output_dir/<variant>/seed_<s>); drop it")
        setattr(base, dest, action.default)
    return base


def plan_runs(args: argparse.Namespace, variants: dict[str, str], root: Path) -> list[PlannedRun]:
    parser = pretrain_args_parser(add_help=False)
    base = pretrain_base(args, parser)
    runs = []
    for variant, flags in variants.items():
        variant_args = raising_parser(pretrain_args_parser(add_help=False), f"variant {variant} ({flags!r})")
        run_args = variant_args.parse_args(shlex.split(flags), namespace=copy.deepcopy(base))
        per_run = [dest for dest in PER_RUN_DESTS if getattr(run_args, dest) != getattr(base, dest)]
        if per_run:
            raise UserError(f"variant {variant}: --{per_run[0]} is set by the ablation for each run; drop it")
        try:
            check_pretrain_args(run_args)
        except UserError as exc:
            raise UserError(f"variant {variant}: {exc}") from None
        eval_model = args.eval_model or encoder_name(run_args.model)
        if eval_model not in models_vit.CLASSIFIERS.names():
            raise UserError(f"--eval_model: no classifier matches --model {run_args.model}; pass --eval_model "
                            f"(one of {', '.join(models_vit.CLASSIFIERS.names())})")
        for seed in args.seeds:
            run_args.seed, run_args.output_dir = seed, str(root / variant / f"seed_{seed}")
            runs.append(plan_run(args, variant, seed, run_args, parser, eval_model))
    return runs


def plan_run(args: argparse.Namespace, variant: str, seed: int, run_args: argparse.Namespace,
             parser: argparse.ArgumentParser, eval_model: str) -> PlannedRun:
    directory = Path(run_args.output_dir)
    evaluation = {"eval_model": eval_model, "knn_k": args.knn_k, "probe_epochs": args.probe_epochs,
                  "probe_batch_size": args.probe_batch_size, "probe_blr": args.probe_blr,
                  "probe_optimizer": args.probe_optimizer, "eval_seed": args.eval_seed, "amp": "none"}
    identity = {"pretrain": {k: v for k, v in sorted(vars(run_args).items()) if k not in RUNTIME_DESTS},
                "evaluation": evaluation}
    run = PlannedRun(variant, seed, directory, identity)
    pretrain_argv = namespace_to_argv(parser, run_args, skip=("seed",)) + ["--seed", str(seed)]
    run.stages.append(Stage("pretrain", "main_pretrain.py", pretrain_argv,
                            directory / "log.txt", final_epoch=run_args.epochs - 1))
    common = ["--model", eval_model, "--finetune", str(directory / "checkpoint-last.pth"), "--amp", "none",
              "--seed", str(args.eval_seed), "--device", run_args.device,
              "--bad_images", run_args.bad_images, "--video_decoder", run_args.video_decoder]
    if run_args.num_workers is not None:
        common += ["--num_workers", str(run_args.num_workers)]
    if run_args.data_path:
        common += ["--data_path", run_args.data_path]
    if run_args.input_size:
        common += ["--input_size", str(run_args.input_size)]
    if is_video_model(run_args.model):   # the clips the encoder was trained on
        common += ["--num_frames", str(run_args.num_frames), "--sampling_rate", str(run_args.sampling_rate)]
    if not run_args.pin_mem:
        common += ["--no-pin_mem"]
    for encoder in ("student", "teacher") if has_teacher(run_args) else ("student",):
        which = common + (["--teacher"] if encoder == "teacher" else [])
        knn_dir, probe_dir = directory / f"knn_{encoder}", directory / f"linprobe_{encoder}"
        run.stages.append(Stage(f"knn_{encoder}", "main_knn.py",
                                which + ["--nb_knn", str(args.knn_k), "--output_dir", str(knn_dir)],
                                knn_dir / "log_knn.txt"))
        run.stages.append(Stage(f"linprobe_{encoder}", "main_linprobe.py",
                                which + ["--epochs", str(args.probe_epochs), "--batch_size", str(args.probe_batch_size),
                                         "--blr", str(args.probe_blr), "--optimizer", args.probe_optimizer,
                                         "--save_every", str(args.probe_epochs), "--output_dir", str(probe_dir)],
                                probe_dir / "log.txt", final_epoch=args.probe_epochs - 1))
    return run


def check_identity(run: PlannedRun) -> None:
    """A run folder made by other settings is never mixed into these results."""
    record = run.directory / "run.json"
    if not record.is_file():
        return
    saved = json.loads(record.read_text()).get("identity") or {}
    saved["pretrain"] = legacy_settings(saved.get("pretrain") or {})   # runs made before a flag was renamed
    wanted = json.loads(json.dumps(run.identity))   # as it reads back (tuples become lists)
    changed = [f"{section} {key}" for section in wanted for key in wanted[section]
               if saved.get(section, {}).get(key) != wanted[section][key]]
    if changed:
        raise UserError(f"{run.directory}: made with other settings ({', '.join(changed)}); rerun with the "
                        f"original flags, or choose another --output_dir")


def write_run_record(run: PlannedRun) -> None:
    run.directory.mkdir(parents=True, exist_ok=True)
    record = {"variant": run.variant, "seed": run.seed, "identity": run.identity,
              "commands": [s.command for s in run.stages]}
    write_bytes_atomic(run.directory / "run.json", (json.dumps(record, indent=1) + "\n").encode())


def execute(run: PlannedRun, threads: int, started: Callable[[subprocess.Popen], None] = lambda process: None,
            env: dict[str, str] | None = None) -> str | None:
    """Run the stages still missing in one new Python process (imports paid once per run, not per
    stage); returns None, or what failed and where its log is. `started` gets the process; `env`
    adds to its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           **(env or {})}
    (run.directory / "logs").mkdir(parents=True, exist_ok=True)
    pending = [[s.name, s.script, s.argv, str(run.directory / "logs" / f"{s.name}.log")] for s in run.pending()]
    with open(run.directory / "logs" / "process.log", "a") as out:   # what happens outside the stages
        process = subprocess.Popen([sys.executable, str(REPO / "main_ablation.py"), STAGES_ENTRY, json.dumps(pending)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        started(process)
        while True:   # wakes up regularly, so that a signal handler of this process runs promptly
            try:
                code = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
    unfinished = run.pending()
    if not unfinished and code == 0:
        return None
    log_path = run.directory / "logs" / (f"{unfinished[0].name}.log" if unfinished else "process.log")
    lines = [line for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    what = unfinished[0].name if unfinished else "the run"
    return f"{what} did not finish (exit status {code}: {lines[-1].strip()[:300] if lines else ''}); log: {log_path}"


def run_stages(stages: list[list]) -> int:
    """In this process, each stage's script main in turn, its output appended to its log; stops at
    the first that fails and returns its exit status."""
    for name, script, argv, log_path in stages:
        module = importlib.import_module(Path(script).stem)
        with open(log_path, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            print(f"$ {shlex.join(['python', script, *argv])}", flush=True)
            try:
                module.main(module.get_args_parser().parse_args(argv))
            except UserError as exc:
                print(f"error: {one_line(exc)}", flush=True)
                return EXIT_USER_ERROR
            except SystemExit as exc:   # a graceful stop (75: rerun to resume) or a parse error
                if exc.code not in (None, 0):
                    return exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                return 1
    return 0


class AblationJob:
    """One run as a submitit job. On preemption or timeout (submitit's SIGUSR2) the run's process is
    told to stop (SIGTERM: the script saves a mid-epoch checkpoint), then submitit requeues the
    job, which resumes where it stopped."""

    def __init__(self, run: PlannedRun, threads: int) -> None:
        self.run, self.threads = run, threads

    def __call__(self) -> str | None:
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        running: list[subprocess.Popen] = []
        preempted: list[tuple] = []

        def stop(signum: int, frame) -> None:   # execute() is waiting on the process: no wait here
            preempted.append((signum, frame))
            for process in running:
                process.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGUSR2, stop)
        failure = execute(self.run, self.threads, started=running.append)
        if preempted and callable(submitit_handler):
            submitit_handler(*preempted[0])   # checkpoint(), requeue, exit
        return failure

    def checkpoint(self):
        """submitit's requeue hook: the same run, which resumes where it stopped."""
        return import_submitit().helpers.DelayedSubmission(AblationJob(self.run, self.threads))


def job_gpus(device: str) -> list[str]:
    """The GPUs the runs here are spread over (--device auto or cuda): the visible ones."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_here(runs: list[PlannedRun], jobs: int, threads: int, gpus: list[str]) -> dict[str, str]:
    """Run on this machine, `jobs` at a time, job slot i on GPU gpus[i mod len(gpus)] (when there
    are any); returns run name -> failure."""
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def one(run: PlannedRun) -> tuple[str, str | None]:
        slot = slots.get()
        gpu = gpus[slot % len(gpus)] if gpus else None
        env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        where = f"GPU {gpu}, " if gpu is not None else ""
        started = time.time()
        log.info(f"{run.name}: running {', '.join(s.name for s in run.pending())} ({where}{threads} thread(s))")
        try:
            failure = execute(run, threads, env=env)
        finally:
            slots.put(slot)
        log.info(f"{run.name}: {'failed' if failure else 'done'} in {time.time() - started:.0f} s")
        return run.name, failure

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return {name: failure for name, failure in pool.map(one, runs) if failure}


def run_on_cluster(runs: list[PlannedRun], args: argparse.Namespace, threads: int) -> dict[str, str]:
    """One submitit job per run; waits for them all."""
    executor = make_executor(argparse.Namespace(**{**vars(args), "ntasks_per_node": 1}), "hpm_ablation")
    submitted = [(run, executor.submit(AblationJob(run, threads))) for run in runs]
    for run, job in submitted:
        log.info(f"{run.name}: job {job.job_id}")
    failures = {}
    for run, job in submitted:
        try:
            failure = job.result()
        except Exception as exc:   # the job itself died: submitit's error names its log
            failure = f"job {job.job_id} failed: {' '.join(str(exc).split())[:300]}"
        if failure:
            failures[run.name] = failure
    return failures


def run_result(run: PlannedRun) -> dict:
    """What a finished run's logs say: its metrics and its reconstruction-loss curve."""
    stages = {s.name: s for s in run.stages}
    by_epoch = {r["epoch"]: r for r in stages["pretrain"].records()}
    curve = [by_epoch[e]["train_recon"] for e in sorted(by_epoch)]
    metrics: dict = dict.fromkeys(METRICS)
    metrics["recon"] = curve[-1]
    k = run.identity["evaluation"]["knn_k"]
    for encoder, suffix in (("student", ""), ("teacher", "_teacher")):
        if f"knn_{encoder}" in stages:
            metrics[f"knn{suffix}"] = stages[f"knn_{encoder}"].records()[-1][f"k{k}_acc1"]
            metrics[f"probe{suffix}"] = stages[f"linprobe_{encoder}"].records()[-1]["test_acc1"]
    return {"variant": run.variant, "seed": run.seed, "directory": str(run.directory), "metrics": metrics,
            "recon_curve": curve, "commands": [s.command for s in run.stages]}


def write_results(root: Path, runs: list[PlannedRun], variants: dict[str, str], baseline: str,
                  args: argparse.Namespace) -> dict:
    finished = [run_result(r) for r in runs if not r.pending()]
    names = [v for v in variants if any(r["variant"] == v for r in finished)]
    summary = summarize(finished, names, baseline)
    evaluation = runs[0].identity["evaluation"]
    results = {"version": RESULTS_VERSION, "baseline": baseline, "variants": variants, "seeds": args.seeds,
               "evaluation": evaluation, "summary": summary, "runs": finished,
               "command": shlex.join(["python", "main_ablation.py", *namespace_to_argv(get_args_parser(), args)])}
    write_bytes_atomic(root / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    text = [f"# Ablation: {', '.join(names)} (baseline {baseline})", "",
            markdown_table(summary, variants, baseline),
            f"Mean ± sample std over seeds; Δ: the difference to {baseline} run by run (same seed), mean ± std "
            f"over seeds, t = mean / (std / √n). Top-1 on the validation split after the last epoch: "
            f"{evaluation['knn_k']}-NN on fp32 features, linear probe {evaluation['probe_epochs']} epochs "
            f"({evaluation['probe_optimizer']}, blr {evaluation['probe_blr']}, batch "
            f"{evaluation['probe_batch_size']}); evaluation seed {evaluation['eval_seed']}. Every run's commands: "
            f"results.json.", "", f"`{results['command']}`", ""]
    write_bytes_atomic(root / "results.md", "\n".join(text).encode())
    if importlib.util.find_spec("matplotlib") is not None:
        curves = {v: {r["seed"]: r["recon_curve"] for r in finished if r["variant"] == v} for v in names}
        draw_figure(summary, curves, root / "results.png")
    else:
        log.warning("no matplotlib: results.png not drawn (pip install -r requirements-dev.txt)")
    return results


def main(args: argparse.Namespace) -> dict:
    """Run what is missing, then write results.{json,md,png}; returns the results."""
    setup_logging(True)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--jobs and --threads must be at least 1")
    if args.cluster and (args.nodes != 1 or args.ngpus > 1 or args.ntasks_per_node not in (None, 1)):
        raise UserError("--cluster: each run is one process: --nodes 1, --ntasks_per_node 1, --ngpus 0 or 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    variants = parse_variants(args)
    baseline = args.baseline or next((b for b in BASELINES if b in variants), next(iter(variants)))
    if baseline not in variants:
        raise UserError(f"--baseline {baseline}: not among the variants ({', '.join(variants)})")
    root = Path(args.output_dir)
    runs = plan_runs(args, variants, root)
    for run in runs:
        check_identity(run)
    check_output_dir(args.output_dir)
    todo = [r for r in runs if r.pending()]
    log.info(f"{len(runs)} runs ({len(variants)} variants x {len(args.seeds)} seeds): {len(runs) - len(todo)} "
             f"finished, {len(todo)} to run")
    for run in todo:
        write_run_record(run)
    if args.cluster:
        failures = run_on_cluster(todo, args, args.threads or args.cpus_per_task) if todo else {}
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        failures = run_here(todo, args.jobs, args.threads or max(1, cores // args.jobs), job_gpus(args.device)) \
            if todo else {}
    results = write_results(root, runs, variants, baseline, args)
    log.info(f"results: {root / 'results.md'}\n" + markdown_table(results["summary"], variants, baseline))
    if failures:
        raise UserError(f"{len(failures)} run(s) failed, the others are in the results; fix and rerun the same "
                        f"command to finish them: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == [STAGES_ENTRY]:   # the process execute() starts for one run
        sys.exit(run_stages(json.loads(sys.argv[2])))
    run_cli(lambda: main(get_args_parser().parse_args()))
