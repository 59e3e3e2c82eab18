"""Token layouts: what differs between images and clips for the pretraining network, asked instead
of branched on. One object per modality, built once from the preset, owns the embedding, the prefix
tokens, the position table, patchify / unpatchify, the pixel target, the random and hard masks with
their unit, and the unit the ranking objective compares.

- `ImageLayout`: timm's PatchEmbed, a class token, the 2-D sin-cos table, MAE's target (the
  normalised patches; norm-pix per patch in the loss), uniform masks, ranking per patch.
- `ClipLayout`: VideoMAE's tubelet embedding, no prefix token, the fixed 1-D sinusoid table,
  VideoMAE's target (the un-normalised clip's tubelets, norm-pix per tubelet channel), and a masking
  `unit`: `tube` (VideoMAE's tube masks; HPM ranks each tube's predicted loss averaged over time) or
  `token` (uniform per token; HPM ranks every token).
"""
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from util.losses import relative_loss_prediction, relative_loss_prediction_chunked, tubelet_normalised_target
from util.masking import (
    hard_patch_mask,
    hard_tube_mask,
    mask_policy,
    num_masked_patches,
    num_masked_per_frame,
    random_mask,
    tube_mask,
    tube_means,
)
from util.normalization import IMAGENET, Stats
from util.patches import TubeletEmbed, patchify, tubelet_patchify, tubelet_unpatchify, unpatchify
from util.pos_embed import get_1d_sinusoid_table, get_2d_sincos_pos_embed

MASK_UNITS = ("tube", "token")


class ImageLayout:
    """Images (N, C, H, W) as MAE tokenises them: one class token, then the patches row by row."""

    video = False
    num_prefix = 1
    norm_pix_in_loss = True    # MAE's norm-pix: one mean / variance per patch, taken by the loss
    relative_objective: Callable = staticmethod(relative_loss_prediction)

    def __init__(self, img_size: int, patch_size: int, in_chans: int, mask_ratio: float) -> None:
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not divisible by the patch size {patch_size}: "
                             f"use a multiple of {patch_size} (--input_size)")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.num_masked = num_masked_patches(self.num_patches, mask_ratio)
        self.patch_dim = patch_size * patch_size * in_chans

    def embedding(self, embed_dim: int) -> nn.Module:
        return PatchEmbed(self.img_size, self.patch_size, self.in_chans, embed_dim)

    def position_table(self, dim: int) -> torch.Tensor:
        """(1, prefix + L, dim): the class token's row, then each patch's."""
        return get_2d_sincos_pos_embed(dim, self.grid_size).unsqueeze(0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C)"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)"""
        return unpatchify(patches, self.patch_size, self.in_chans)

    def pixel_target(self, imgs: torch.Tensor, norm_pix: bool, stats: Stats = IMAGENET) -> torch.Tensor:
        """MAE's: the normalised input's patches (norm-pix, when asked, is applied in the loss). (N, L, P)"""
        return self.patchify(imgs)

    def random_mask(self, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(batch_size, self.num_patches, self.num_masked, device=device, generator=generator)

    def mask_policy(self, kind: str) -> Callable[..., torch.Tensor]:
        """The MAE baseline's masks by name: random, UM-MAE's regular, or one visible block;
        called (batch_size, device, generator)."""
        return mask_policy(kind, self.grid_size, self.num_masked)

    def num_hard(self, alpha: float) -> int:
        """Units (patches) chosen as hard at hard-patch share `alpha`."""
        return int(self.num_masked * alpha)

    def hard_mask(self, pred_loss: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        return hard_patch_mask(pred_loss, self.num_masked, alpha, generator=generator)

    def ranking_units(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values of the masked tokens (N, M) -> the values the ranking objective compares."""
        return values


class ClipLayout(ImageLayout):
    """Clips (N, C, T, H, W) as VideoMAE tokenises them: no prefix token, tubelets of `tubelet_size`
    frames, token index t * (g * g) + h * g + w (time slowest); masks and ranking in `unit`."""

    video = True
    num_prefix = 0
    norm_pix_in_loss = False   # VideoMAE's norm-pix is part of the target, per tubelet channel

    def __init__(self, img_size: int, patch_size: int, in_chans: int, mask_ratio: float, num_frames: int,
                 tubelet_size: int, unit: str = "tube") -> None:
        if unit not in MASK_UNITS:
            raise ValueError(f"mask unit {unit!r}: use tube or token")
        super().__init__(img_size, patch_size, in_chans, mask_ratio)
        if num_frames % tubelet_size:
            raise ValueError(f"{num_frames} frames do not divide into tubelets of {tubelet_size}: use a multiple of "
                             f"{tubelet_size} (--num_frames)")
        self.num_frames, self.tubelet_size, self.unit = num_frames, tubelet_size, unit
        self.frames = num_frames // tubelet_size          # temporal token positions
        self.num_spatial = self.num_patches
        self.num_patches = self.frames * self.num_spatial
        self.masked_per_frame = num_masked_per_frame(self.num_spatial, mask_ratio)
        self.num_masked = self.frames * self.masked_per_frame
        self.patch_dim *= tubelet_size
        # the chunked objective: the 1408 x 1408 token pairs of a clip would not fit at once
        self.relative_objective = relative_loss_prediction if unit == "tube" else relative_loss_prediction_chunked

    def embedding(self, embed_dim: int) -> nn.Module:
        return TubeletEmbed(self.img_size, self.patch_size, self.in_chans, embed_dim, num_frames=self.num_frames,
                            tubelet_size=self.tubelet_size)

    def position_table(self, dim: int) -> torch.Tensor:
        return get_1d_sinusoid_table(self.num_patches, dim).unsqueeze(0)

    def patchify(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, L, t*p*p*C)"""
        return tubelet_patchify(clips, self.tubelet_size, self.patch_size)

    def unpatchify(self, tubelets: torch.Tensor) -> torch.Tensor:
        """(N, L, t*p*p*C) -> (N, C, T, H, W)"""
        return tubelet_unpatchify(tubelets, self.tubelet_size, self.patch_size,
                                  (self.frames, self.grid_size, self.grid_size), self.in_chans)

    def pixel_target(self, clips: torch.Tensor, norm_pix: bool, stats: Stats = IMAGENET) -> torch.Tensor:
        """VideoMAE's: the clip un-normalised with the `stats` it was normalised with, cut into tubelets,
        each channel of each tubelet standardised with `norm_pix`. (N, L, P)"""
        mean, std = stats.tensors(clips.device, 5)
        tubelets = self.patchify(clips.float() * std + mean)
        return tubelet_normalised_target(tubelets, self.in_chans) if norm_pix else tubelets

    def mask_policy(self, kind: str) -> Callable[..., torch.Tensor]:
        """VideoMAE's baseline: its random masks in the layout's unit (tube or token) alone."""
        if kind != "random":
            raise ValueError(f"the {kind} mask is for images; clips are masked in tubes or tokens")
        return self.random_mask

    def random_mask(self, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        if self.unit == "token":
            return super().random_mask(batch_size, device, generator)
        return tube_mask(batch_size, self.frames, self.num_spatial, self.masked_per_frame, device=device,
                         generator=generator)

    def num_hard(self, alpha: float) -> int:
        """Units (tubes, or tokens) chosen as hard at hard-patch share `alpha`."""
        return int((self.masked_per_frame if self.unit == "tube" else self.num_masked) * alpha)

    def hard_mask(self, pred_loss: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        if self.unit == "token":
            return super().hard_mask(pred_loss, alpha, generator)
        return hard_tube_mask(pred_loss, self.frames, self.masked_per_frame, alpha, generator=generator)

    def ranking_units(self, values: torch.Tensor) -> torch.Tensor:
        """Tube unit: each masked tube's mean over time (N, m); token unit: the tokens themselves."""
        return tube_means(values, self.frames) if self.unit == "tube" else values
