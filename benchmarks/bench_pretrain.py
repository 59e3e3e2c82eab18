"""Speed of the real pretraining step (engine.train_step with engine_pretrain's task) on synthetic images.

Prints and optionally writes as JSON: seconds per iteration (median/min/max), images/s, the time
of each phase, FLOPs per iteration (torch's FLOP counter, given model-FLOP formulas for the fused
attention kernels), achieved FLOP/s, the device's measured dense matmul throughput in the same
run, their ratio (MFU) and peak memory. With `--paired_mae` an MAE step of the same model runs next
to every HPM step (ABBA order) and the HPM/MAE time ratio is taken pair by pair, so that the
machine's drift cancels out of it. With `--profile` one more step is split by operator class
(matrix products, attention, the rest): where the MFU is lost.

    python benchmarks/bench_pretrain.py --model mae_vit_base_patch16 --batch_size 8 --amp none --threads 2
"""
import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Run, train_step  # noqa: E402
from engine_pretrain import PretrainTask, build_student, build_target, make_optimizer, pretrain_parents  # noqa: E402
from util.args import make_parser  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.precision import make_scaler, resolve_amp  # noqa: E402
from util.process import start_process  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = make_parser("pretraining step benchmark", pretrain_parents())
    g = p.add_argument_group("benchmark")
    g.add_argument("--iters", type=int, default=5, help="timed iterations")
    g.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    g.add_argument("--json", type=str, default=None, help="write the results to this file")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--probe_seconds", type=float, default=1.0, help="length of each matmul-peak probe")
    g.add_argument("--paired_mae", action="store_true",
                   help="also time an MAE step next to every HPM step and report the pairwise HPM/MAE time ratio")
    g.add_argument("--profile", action="store_true",
                   help="also profile one step: time and FLOP/s of the matrix products, the attention kernels and "
                        "everything else (CPU)")
    p.set_defaults(model="mae_vit_base_patch16", batch_size=8, amp="none", lr=1e-4, epochs=2, clip_grad=5.0)
    return p.parse_args()


def random_target_weights(args: argparse.Namespace) -> str:
    """A randomly initialised frozen target model (its speed does not depend on the weights) in a
    temporary file, when no --target_checkpoint is given."""
    import tempfile

    import timm

    from util.targets import DEFAULT_MODELS
    model = timm.create_model(args.target_model or DEFAULT_MODELS[args.target], pretrained=False,
                              **({"num_classes": 0} if args.target == "dino" else {}))
    path = Path(tempfile.mkdtemp()) / f"random_{args.target}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Best dense matmul throughput (FLOP/s) seen in `seconds` on square operands that saturate the device."""
    n = 8192 if device.type == "cuda" else 2048
    reps = 20 if device.type == "cuda" else 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.time() + seconds
    while time.time() < deadline:
        synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        synchronize(device)
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """q @ k^T and p @ v."""
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The four products of the gradients: twice the forward. The fused kernels also recompute
    q @ k^T, which torch's own formula counts; that is not the model's work, so it is left out."""
    return 2 * sdpa_flop_count(query, key, value)


# Model FLOPs of the fused attention kernels, the same as timm's unfused path (and the reference's
# attention) counts through its batched products. torch's FLOP counter has no formula at all for
# the CPU kernel (its attention would count 0) and counts the recomputation in the CUDA ones.
_aten = torch.ops.aten
ATTENTION_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    _aten._scaled_dot_product_flash_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_efficient_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_cudnn_attention_backward: _attention_backward_flops,
}


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (matrix products, convolutions and attention)."""
    return sum(flops_by_op(fn).values())


def flops_by_op(fn) -> dict[str, int]:
    """FLOPs of one call of `fn` per operator ("aten.mm", ...)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS) as counter:
        fn()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def operator_class(name: str) -> str:
    """"attention" (the fused kernels), "matmul" (products and convolutions) or "other"."""
    if "attention" in name:
        return "attention"
    return "matmul" if any(k in name for k in ("mm", "convolution", "linear")) else "other"


def profile_step(fn, device: torch.device, probe) -> dict:
    """Where one step's time goes: for each operator class its share of the operators' time (self time,
    so nothing is counted twice), its FLOPs and its FLOP/s as a share of the matmul peak probed right
    before and after the profiled step (`probe()`, their mean). Elementwise operators, normalisation,
    the optimizer and the EMA are "other" and carry no FLOPs."""
    from torch.profiler import ProfilerActivity, profile
    flops: dict[str, int] = defaultdict(int)
    for op, count in flops_by_op(fn).items():
        flops[operator_class(op)] += count
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before = probe()
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    peak = (before + probe()) / 2
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if event.key.startswith("aten::"):
            seconds[operator_class(event.key.replace("::", "."))] += own / 1e6
    total = sum(seconds.values())
    return {"peak_flops_per_s": peak, **{
        name: {"seconds": seconds[name], "time_share": seconds[name] / total, "flops": flops[name],
               "of_peak": flops[name] / seconds[name] / peak if seconds[name] and flops[name] else 0.0}
        for name in ("matmul", "attention", "other")}}


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def abba_order(iters: int) -> list[str]:
    """HPM, MAE, MAE, HPM, ...: adjacent runs form the pairs, and a linear drift favours neither mode."""
    return [("HPM", "MAE", "MAE", "HPM")[i % 4] for i in range(2 * iters)]


def main() -> None:
    args = parse_args()
    if args.paired_mae and not args.learning_loss:
        raise SystemExit("--paired_mae times MAE next to HPM: drop --no-learning_loss")
    if args.threads:
        torch.set_num_threads(args.threads)
    _, device = start_process(args.device)
    amp_dtype = resolve_amp(args.amp, device)

    if args.target in ("clip", "dino") and args.target_checkpoint is None:
        args.target_checkpoint = random_target_weights(args)
    targets = {}

    def make_step(learning_loss: bool):
        """Epoch 0 of 2: the teacher masks a quarter of the masked patches as hard (alpha 0.25)."""
        mode_args = argparse.Namespace(**{**vars(args), "learning_loss": learning_loss})
        frozen, target_dim = build_target(mode_args)
        torch.manual_seed(0)
        student = build_student(mode_args, target_dim).to(device)
        task = PretrainTask(student, mode_args, device, amp_dtype, frozen_target=frozen)
        targets[learning_loss] = task.frozen_target
        run = Run(task, None, make_optimizer(student, mode_args, device), make_scaler(device, amp_dtype), device,
                  DistInfo(), Path("."), "", mode_args)
        task.train()

        def step(imgs: torch.Tensor, timer=None):
            kwargs = {"timer": timer} if timer is not None else {}
            return train_step(run, (imgs, None), 0, last_micro_step=True, **kwargs)
        return student, step

    student, step = make_step(args.learning_loss)
    students = [student]
    size = student.patch_embed.img_size[0]
    clip = (args.num_frames,) if student.video else ()          # clips (N, 3, T, H, W) for the videomae_* models
    imgs = torch.randn(args.batch_size, 3, *clip, size, size, device=device)
    mode = ("HPM" if args.learning_loss else "VideoMAE" if student.video else "MAE")
    steps = {mode: step}
    if args.paired_mae:
        mae_student, steps["MAE"] = make_step(False)
        students.append(mae_student)
    for run in steps.values():
        for _ in range(args.warmup):
            run(imgs)
    synchronize(device)

    # A shared machine's throughput drifts: probe the matmul peak between timed iterations, so that
    # every iteration has a probe right before and right after it.
    peak_dtype = amp_dtype or torch.float32
    order = abba_order(args.iters) if args.paired_mae else [mode] * args.iters
    times, peaks = [], [matmul_peak(device, peak_dtype, seconds=args.probe_seconds)]
    for name in order:
        t = time.perf_counter()
        steps[name](imgs)
        synchronize(device)
        times.append(time.perf_counter() - t)
        peaks.append(matmul_peak(device, peak_dtype, seconds=args.probe_seconds))
    peaks_around = [(before + after) / 2 for before, after in zip(peaks, peaks[1:])]

    phases: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def timer(phase: str):
        synchronize(device)
        t = time.perf_counter()
        yield
        synchronize(device)
        phases[phase].append(time.perf_counter() - t)

    # each mode's own peak memory, from a step of its own (the timed steps interleave the modes, and the
    # FLOP count below runs eagerly: neither may set a compiled run's figure)
    peak_mem = {}
    for name, run in steps.items():
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(imgs)
        synchronize(device)
        peak_mem[name] = peak_memory(device)

    for _ in range(max(1, min(3, args.iters))):
        step(imgs, timer)
    peak = max(peaks)

    def model_flops(fn) -> int:
        """The model's FLOPs: with --grad_checkpointing the backward's recomputed forward is work the
        model needs only to save memory, so the count (and the MFU) leaves it out."""
        for each in students:
            each.grad_checkpointing = False
        try:
            return count_flops(fn)
        finally:
            for each in students:
                each.grad_checkpointing = args.grad_checkpointing

    def timing(name: str) -> dict:
        runs = [(t, p) for n, t, p in zip(order, times, peaks_around) if n == name]
        mode_times = [t for t, _ in runs]
        flops = model_flops(lambda: steps[name](imgs))
        median = statistics.median(mode_times)
        return {
            "iter_s_median": median, "iter_s_min": min(mode_times), "iter_s_max": max(mode_times),
            "iter_s_all": mode_times, "images_per_s": args.batch_size / median,
            "flops_per_iter": flops, "achieved_flops_per_s": flops / median, "mfu": flops / median / peak,
            "mfu_per_iter_median": statistics.median(flops / t / p for t, p in runs),
            "peak_mem_bytes": peak_mem[name],
        }

    result = {
        "model": args.model, "mode": mode, "batch_size": args.batch_size,
        "input_size": size, "amp": str(amp_dtype or "fp32"), "compile": args.compile, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "iters": args.iters, "warmup": args.warmup,
        **timing(mode),
        "phase_s": {k: statistics.median(v) for k, v in phases.items()},
        "target": args.target,
        "target_flops_per_iter": count_flops(lambda: targets[args.learning_loss](imgs)) if targets[args.learning_loss]
        else 0,
        "matmul_peak_flops_per_s": peak, "matmul_peak_dtype": str(peak_dtype),
        "matmul_peak_probes_flops_per_s": peaks,
    }
    if args.profile:
        result["profile"] = profile_step(lambda: step(imgs), device,
                                         lambda: matmul_peak(device, peak_dtype, seconds=args.probe_seconds))
    if args.paired_mae:
        mae = timing("MAE")
        # In ABBA order the k-th HPM and the k-th MAE run are the k-th adjacent pair.
        ratios = [t_hpm / t_mae for t_hpm, t_mae in zip(result["iter_s_all"], mae["iter_s_all"])]
        result["paired_mae"] = {**mae, "order": order, "hpm_mae_ratio_all": ratios,
                                "hpm_mae_ratio_median": statistics.median(ratios)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
