"""Patch layout shared by the model, the losses and the visualisations."""
import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), values in (row-in-patch, col-in-patch, channel) order."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W) for a square grid; the inverse of `patchify`."""
    n, num_patches, _ = patches.shape
    p = patch_size
    g = int(round(num_patches ** 0.5))
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    x = patches.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


def gather_patches(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens `ids` (N, K) from `x` (N, L, D) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
