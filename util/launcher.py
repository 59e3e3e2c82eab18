"""SLURM (or local) submission of any script through submitit, with preemption requeue.

Each `submitit_*.py` builds its parser from the script's own (`parents=`) plus the options
below, and hands the script's `main` to `submit`.
"""
import argparse
import importlib
import shutil
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import submitit

from util.args import HelpFormatter
from util.errors import UserError
from util.preemption import EXIT_PREEMPTED, STOP


def import_submitit() -> ModuleType:
    """submitit, imported when a job is submitted or runs: everything else (the parsers, --jobs runs
    of the ablation) works on machines without it."""
    try:
        import submitit
    except ImportError:
        raise UserError("--cluster needs submitit, which is not installed here: pip install submitit") from None
    return submitit


def cluster_parser(ngpus: int = 8, cluster: str | None = "slurm") -> argparse.ArgumentParser:
    """SLURM resources and the executor; `cluster` None: the caller's default is to run without submitit."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("submitit / SLURM")
    g.add_argument("--ngpus", type=int, default=ngpus, help="GPUs (and tasks) per node; 0 for CPU tasks")
    g.add_argument("--ntasks_per_node", type=int, default=None, help="tasks per node (default: --ngpus, or 1)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per job")
    g.add_argument("--timeout", type=float, default=4320, help="job duration in minutes")
    g.add_argument("--job_dir", type=str, default="./job_dir/%j", help="submitit logs; %%j is the job id")
    g.add_argument("--partition", type=str, default=None, help="SLURM partition")
    g.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (constraint volta32gb)")
    g.add_argument("--constraint", type=str, default=None, help="SLURM constraint")
    g.add_argument("--account", type=str, default=None, help="SLURM account")
    g.add_argument("--qos", type=str, default=None, help="SLURM quality of service")
    g.add_argument("--comment", type=str, default=None, help="SLURM comment")
    g.add_argument("--cpus_per_task", type=int, default=10, help="CPU cores per task")
    g.add_argument("--mem_gb", type=int, default=None, help="memory per node (default: 40 GB per GPU)")
    g.add_argument("--signal_delay_s", type=int, default=120,
                   help="seconds before the time limit at which the job is told to save and requeue")
    where = "local/debug run the same job on this machine without SLURM"
    g.add_argument("--cluster", choices=["slurm", "local", "debug"], default=cluster,
                   help=where if cluster else f"submit through submitit (default: run here without it); {where}")
    return p


def launcher_parser(script_parser: argparse.ArgumentParser, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, parents=[script_parser, cluster_parser()],
                                   formatter_class=HelpFormatter)


class Trainer:
    """The picklable job: runs `module.main(args)` in each task; requeues itself on preemption."""

    def __init__(self, module: str, args: argparse.Namespace) -> None:
        self.module, self.args = module, args

    def __call__(self) -> None:
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        for flag in ("output_dir", "log_dir"):
            value = getattr(self.args, flag, None)
            if value:
                setattr(self.args, flag, value.replace("%j", str(job_env.job_id)))
        usr_sig = signal.SIGUSR2
        submitit_handler = signal.getsignal(usr_sig)

        def requeue() -> None:
            submitit_handler(usr_sig, None)   # rank 0: calls self.checkpoint(), requeues and exits
            sys.exit(EXIT_PREEMPTED)          # other ranks just stop

        STOP.install((usr_sig,), after_save=requeue)
        importlib.import_module(self.module).main(self.args)

    def checkpoint(self) -> "submitit.helpers.DelayedSubmission":
        """The requeued job resumes from output_dir/checkpoint-last.pth (written before requeueing)."""
        submitit = import_submitit()
        args = argparse.Namespace(**vars(self.args))
        if hasattr(args, "resume"):
            args.resume = str(Path(args.output_dir) / "checkpoint-last.pth")
        return submitit.helpers.DelayedSubmission(Trainer(self.module, args))


def make_executor(args: argparse.Namespace, name: str) -> "submitit.Executor":
    submitit = import_submitit()
    job_dir = Path(args.job_dir)
    tasks = args.ntasks_per_node or max(args.ngpus, 1)
    if args.cluster == "debug":
        return submitit.DebugExecutor(folder=job_dir)
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=30)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=tasks, gpus_per_node=args.ngpus,
                                   signal_delay_s=args.signal_delay_s)
        return executor
    if shutil.which("srun") is None:
        raise UserError("--cluster slurm: no SLURM here (srun not found); use --cluster local to run the job on "
                        "this machine")
    executor = submitit.AutoExecutor(folder=job_dir, cluster="slurm", slurm_max_num_timeout=30)
    options = {f"slurm_{k}": getattr(args, k) for k in ("partition", "account", "qos", "comment") if getattr(args, k)}
    constraint = "volta32gb" if args.use_volta32 else args.constraint
    if constraint:
        options["slurm_constraint"] = constraint
    executor.update_parameters(mem_gb=args.mem_gb or 40 * max(args.ngpus, 1), gpus_per_node=args.ngpus,
                               tasks_per_node=tasks, cpus_per_task=args.cpus_per_task, nodes=args.nodes,
                               timeout_min=int(args.timeout), name=name,
                               slurm_signal_delay_s=args.signal_delay_s, **options)
    return executor


def submit(module: str, args: argparse.Namespace) -> "submitit.Job":
    """Submit `module.main(args)`; returns the job (its id also names %j in the paths)."""
    job = make_executor(args, f"hpm_{module}").submit(Trainer(module, args))
    print(f"submitted job {job.job_id}; submitit logs in {args.job_dir.replace('%j', str(job.job_id))}")
    return job
