"""Optimizer plumbing shared by every training loop: the scheduled learning rate, gradient
clipping and the (scaled) optimizer step."""
import torch

from util.schedules import cosine_lr


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


def effective_lr(args, world_size: int) -> float:
    """--lr if given, else blr x effective batch / 256."""
    eff_batch = args.batch_size * args.accum_iter * world_size
    return args.lr if args.lr is not None else args.blr * eff_batch / 256


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE's layer index for layer-wise lr decay: embeddings 0, block i is i + 1, everything after
    the blocks (norm, fc_norm, head) `num_layers` = depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, no_weight_decay: set[str],
                     layer_decay: float) -> list[dict]:
    """MAE's parameter groups for fine-tuning: `lr_scale` = layer_decay ** (depth + 1 - layer id)
    (1.0 for the norms and the head, with either pooling), no weight decay on 1-D parameters and
    on `no_weight_decay` (position embedding, class token)."""
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in no_weight_decay
        layer = vit_layer_id(name, num_layers)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (num_layers - layer)})
        group["params"].append(param)
    return list(groups.values())
