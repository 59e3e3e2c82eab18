"""Small runtime choices shared by the scripts: process start, precision, seeding, JSON logs."""
import ctypes
import ctypes.util
import json
import logging
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from util.distributed import DistInfo, init_distributed, resolve_device
from util.logger import setup_logging
from util.schedules import cosine_lr

log = logging.getLogger("hpm")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


def retain_freed_memory() -> bool:
    """Keep freed blocks up to 32 MiB in the process instead of returning them to the kernel.

    Every CPU training step frees and reallocates the same activations and gradients; glibc's
    defaults unmap or trim them, and faulting ~100k pages back in cost 0.3-0.8 s of kernel time
    per ViT-B step on 2 cores (BENCHMARKS.md). Returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def start_process(device_name: str, dist_url: str = "env://") -> tuple[DistInfo, torch.device]:
    """What every script does first: pick the device, join the process group, set up logging,
    and on CPU keep freed memory for reuse."""
    info, device = init_distributed(resolve_device(device_name), dist_url)
    setup_logging(info.is_main)
    if device.type == "cpu":
        retain_freed_memory()
    return info, device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32; CUDA-only precisions switch off on CPU."""
    if device.type != "cuda":
        if amp in ("fp16", "bf16"):
            log.warning(f"--amp {amp} needs a GPU; running in fp32 on {device}")
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_epoch(seed: int, rank: int, epoch: int) -> int:
    """Seed every global RNG from (seed, rank, epoch): a resumed run repeats an uninterrupted one."""
    epoch_seed = (seed * 7919 + rank) * 100_003 + epoch
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)
    random.seed(epoch_seed)
    return epoch_seed


def append_json_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total 2-norm of `max_norm`, as torch.nn.utils.clip_grad_norm_; returns
    the norm before clipping.

    On CPU torch's per-tensor norms run on one thread and the rescale always rewrites every
    gradient: 86 ms per ViT-B HPM step on 2 cores. Per-tensor BLAS dot products (multi-threaded,
    and closer to the float64 norm) and rescaling only when the norm exceeds `max_norm` (reading
    a CPU tensor syncs nothing) take 29 ms (BENCHMARKS.md). Other devices keep torch's version.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    if not total <= max_norm:   # NaN included: torch's version then turns the gradients into NaN too
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
                   clip_grad: float | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Unscale, clip, step, update the scaler, zero the gradients; no host sync.

    Returns the gradient norm before clipping (None without clipping) and whether the fp16
    scaler skipped this step for non-finite gradients (a 0-d tensor, always 0 without fp16).
    """
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, clip_grad) if clip_grad else None
    scale_before = scaler._scale.clone() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    skipped = (scaler._scale < scale_before).float() if scale_before is not None else torch.zeros(())
    return grad_norm, skipped


def set_scheduled_lr(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Warm-up + cosine learning rate at fractional `epoch`, scaled per group by its `lr_scale`."""
    lr = cosine_lr(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
