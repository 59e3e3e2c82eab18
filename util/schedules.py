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


def teacher_decay_per_step(epoch: int, steps_per_epoch: int, half_life_epochs: float = 1.0) -> float:
    """The reference's schedule with its time unit changed from steps to epochs.

    The reference's 0.999 per step is an EMA half-life of ln 0.5 / ln 0.999 = 693 steps, about one
    ImageNet epoch (625-1250 steps); with 22 steps per epoch (the digits) the same 0.999 leaves
    half of the teacher's random initialisation in place after 40 epochs. Here the half-life is
    `half_life_epochs` epochs at epoch 0 and grows as the reference's does (10x by epoch 100).
    """
    if steps_per_epoch < 1 or half_life_epochs <= 0:
        raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and half_life_epochs ({half_life_epochs}) must be "
                         f"positive")
    growth = math.log(teacher_decay(0)) / math.log(teacher_decay(epoch))
    return 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch * growth))


def ema_half_life(decay: float) -> float:
    """Optimizer steps after which an EMA with this per-step decay keeps half of its old value."""
    return math.log(0.5) / math.log(decay)


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up, then half-cycle cosine to `min_lr`; `epoch` is fractional (per iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
