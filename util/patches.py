"""Patch layout shared by the model, the losses and the visualisations: image patches and video
tubelets (VideoMAE's: token index t * (gh * gw) + h * gw + w, time slowest, as Conv3d's output
flattens)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TubeletEmbed(nn.Module):
    """VideoMAE's tubelet embedding: Conv3d with kernel = stride = (t, p, p); (N, C, T, H, W) ->
    (N, L, D), token index t * (gh * gw) + h * gw + w (time slowest). Its signature is timm's
    PatchEmbed's (`embed_layer=partial(TubeletEmbed, num_frames=..., tubelet_size=...)`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True,
                 dynamic_img_pad: bool = False, *, num_frames: int, tubelet_size: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        if num_frames % tubelet_size:
            raise ValueError(f"{num_frames} frames do not divide into tubelets of {tubelet_size}: use a multiple of "
                             f"{tubelet_size} (--num_frames)")
        if img_size % patch_size or dynamic_img_pad:
            raise ValueError(f"input size {img_size} is not divisible by the patch size {patch_size}: use a "
                             f"multiple of {patch_size} (--input_size)")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.frames = num_frames // tubelet_size
        self.num_patches = self.frames * self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size), bias=bias, device=device, dtype=dtype)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """The Conv3d as what it is, with stride equal to its kernel: the tubelets cut out (time slowest,
        each tubelet's values in the kernel's (C, t, p, p) order) times the kernel as a matrix. One
        matrix product, where cuDNN has sent this convolution in bf16 to slow fallbacks; the output is
        contiguous (N, L, D), so no block's residual stream or LayerNorm works on a strided view."""
        if clips.dim() != 5 or tuple(clips.shape[2:]) != (self.num_frames, *self.img_size):
            raise ValueError(f"expected clips (N, C, {self.num_frames}, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(clips.shape)}")
        n, c, frames, h, w = clips.shape
        t, p = self.tubelet_size, self.patch_size[0]
        tubelets = clips.reshape(n, c, frames // t, t, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return F.linear(tubelets.reshape(n, self.num_patches, -1), self.proj.weight.flatten(1), self.proj.bias)


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


def tubelet_patchify(clips: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, L, t*p*p*C), L = T/t * H/p * W/p; values in (time-in-tubelet, row,
    column, channel) order, VideoMAE's target layout."""
    n, c, frames, h, w = clips.shape
    t, p = tubelet_size, patch_size
    if frames % t or h % p or w % p:
        raise ValueError(f"clip of {frames} frames of {h}x{w} is not divisible into {t} x {p} x {p} tubelets")
    gt, gh, gw = frames // t, h // p, w // p
    x = clips.reshape(n, c, gt, t, gh, p, gw, p)
    x = torch.einsum("ncasbpdq->nabdspqc", x)
    return x.reshape(n, gt * gh * gw, t * p * p * c)


def tubelet_unpatchify(tubelets: torch.Tensor, tubelet_size: int, patch_size: int, grid: tuple[int, int, int],
                       channels: int = 3) -> torch.Tensor:
    """(N, L, t*p*p*C) -> (N, C, T, H, W) for a (T/t, H/p, W/p) token grid; the inverse of
    `tubelet_patchify`."""
    n = tubelets.shape[0]
    t, p = tubelet_size, patch_size
    gt, gh, gw = grid
    x = tubelets.reshape(n, gt, gh, gw, t, p, p, channels)
    x = torch.einsum("nabdspqc->ncasbpdq", x)
    return x.reshape(n, channels, gt * t, gh * p, gw * p)


def gather_patches(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens `ids` (N, K) from `x` (N, L, D) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
