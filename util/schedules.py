"""Per-epoch and per-iteration schedules (spec sections 3 and 4)."""
import math


def hard_patch_alpha(epoch: int, epochs: int, alpha_max: float = 0.5) -> float:
    """Easy-to-hard: the share of masked patches chosen as hard, (e + 1) / E * 0.5."""
    return (epoch + 1) / epochs * alpha_max


def teacher_decay(epoch: int) -> float:
    """EMA decay of the teacher: 0.999 rising linearly to 0.9999 at epoch 100, then constant."""
    if epoch >= 100:
        return 0.9999
    return 0.999 + epoch / 100 * (0.9999 - 0.999)


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up, then half-cycle cosine to `min_lr`; `epoch` is fractional (per iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
