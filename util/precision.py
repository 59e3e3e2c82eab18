"""Mixed precision: which autocast dtype a run uses, the autocast context and the gradient scaler."""
import logging
from contextlib import nullcontext

import torch

log = logging.getLogger("hpm")

AMP_CHOICES = ("auto", "fp16", "bf16", "none")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. CUDA-only precisions switch off on CPU; `auto` is bf16
    where the GPU has it in hardware and fp16 (with the gradient scaler, as the reference) where not."""
    if device.type != "cuda":
        if amp in ("fp16", "bf16"):
            log.warning(f"--amp {amp} needs a GPU; running in fp32 on {device}")
        return None
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0 on: A100, H100, RTX 30xx and later). Not
    `torch.cuda.is_bf16_supported()`, which also counts the slow emulation on V100 and T4."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A gradient scaler that is enabled for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def precision_name(dtype: torch.dtype | None) -> str:
    """How the start line names the autocast dtype."""
    return {torch.float16: "fp16 (with a gradient scaler)", torch.bfloat16: "bf16", None: "fp32"}[dtype]
