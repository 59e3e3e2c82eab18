"""What every script does first: pick the device, join the process group, set up logging; on CPU
keep freed memory for reuse, on GPUs let fp32 matrix products use TF32 and cuDNN pick its kernels
by timing them."""
import ctypes
import ctypes.util
import os

import torch

from util.distributed import DistInfo, init_distributed, resolve_device
from util.logger import setup_logging

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


def start_process(device_name: str, dist_url: str = "env://", timeout_min: float = 30.0,
                  deterministic: bool = False) -> tuple[DistInfo, torch.device]:
    """`deterministic` (--deterministic): deterministic kernels where torch has them (a warning names
    each operator that has none), so that a resumed GPU run retraces an uninterrupted one more closely,
    at some speed; CPU runs are deterministic without it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts: fixed reductions
        torch.use_deterministic_algorithms(True, warn_only=True)
    info, device = init_distributed(resolve_device(device_name), dist_url, timeout_min)
    setup_logging(info.is_main)
    if device.type == "cpu":
        retain_freed_memory()
    else:   # fp32 matrix products (--amp none, kNN features) on tensor cores, as TF32; the fastest cuDNN
        torch.set_float32_matmul_precision("high")   # kernels for the patch embedding's fixed shapes
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    return info, device
