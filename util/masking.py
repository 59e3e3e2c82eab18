"""Patch masks for masked image and video modeling.

Every function returns a boolean (N, L) tensor, True = masked, on the device of its input, with
exactly `num_masked` masked patches per image (per clip: `frames` x `masked_per_frame` for the tube
masks, whose token index is t * S + s for S spatial positions, time slowest). They draw from an
optional `torch.Generator` (which must live on that device), loop over no images and never read
values back to the host.
"""
import math

import torch


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """M = L - int(L * (1 - r)), the reference's rounding."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio} must lie in (0, 1), e.g. --mask_ratio 0.75")
    return num_patches - int(num_patches * (1 - mask_ratio))


def _mask_lowest(scores: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Mask the `num_masked` lowest scores of each row."""
    ids = torch.argsort(scores, dim=1)[:, :num_masked]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)


def random_mask(batch_size: int, num_patches: int, num_masked: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random mask (MAE)."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return _mask_lowest(noise, num_masked)


def regular_mask(batch_size: int, grid_size: int, *, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """UM-MAE's uniform mask: one visible patch per 2x2 cell (mask ratio 0.75).

    As in UM-MAE, the visible position of each cell is drawn without replacement from a pool that
    holds every position equally often (4 * ceil(L / 8) candidates).
    """
    if grid_size % 2:
        raise ValueError(f"regular masking needs an even patch grid, got {grid_size}x{grid_size}")
    cells_side = grid_size // 2
    num_cells = cells_side * cells_side
    pool = 4 * math.ceil(grid_size * grid_size / 8)
    order = torch.argsort(torch.rand(batch_size, pool, device=device, generator=generator), dim=1)
    visible = order[:, :num_cells] % 4                                   # (N, cells): 0..3 in the cell
    cell_mask = torch.ones(batch_size, num_cells, 4, dtype=torch.bool, device=device)
    cell_mask.scatter_(2, visible.unsqueeze(-1), False)
    cell_mask = cell_mask.view(batch_size, cells_side, cells_side, 2, 2).permute(0, 1, 3, 2, 4)
    return cell_mask.reshape(batch_size, grid_size * grid_size)


def block_mask(batch_size: int, grid_size: int, num_masked: int, *, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's block mask: one visible square of side sqrt(L - M) (7 x 7 for ViT-B at
    0.75), everything else masked. Its top-left corner is uniform over the top-left quadrant
    (0 <= row, col < grid // 2), limited so that the square stays inside the grid."""
    num_visible = grid_size * grid_size - num_masked
    side = math.isqrt(num_visible)
    if side * side != num_visible:
        raise ValueError(f"block masking keeps one visible square, but {num_visible} visible patches of a "
                         f"{grid_size}x{grid_size} grid are not a square number: choose --mask_ratio so that "
                         f"L - M is one (0.75 with a grid of even side)")
    corners = min(grid_size // 2, grid_size - side + 1)
    top, left = torch.randint(0, corners, (2, batch_size, 1), device=device, generator=generator)
    pos = torch.arange(grid_size, device=device)
    inside_rows = (pos >= top) & (pos < top + side)                      # (N, g)
    inside_cols = (pos >= left) & (pos < left + side)
    visible = inside_rows.unsqueeze(2) & inside_cols.unsqueeze(1)       # (N, g, g)
    return ~visible.reshape(batch_size, grid_size * grid_size)


def hard_patch_mask(pred_loss: torch.Tensor, num_masked: int, alpha: float, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """HPM's mask from the teacher's predicted losses (N, L).

    The K = int(M * alpha) patches of highest predicted loss are masked; the other M - K masked
    patches are uniform among the remaining L - K. K <= 0 gives a uniformly random mask.
    """
    n, num_patches = pred_loss.shape
    noise = torch.rand(n, num_patches, device=pred_loss.device, generator=generator)
    num_hard = int(num_masked * alpha)
    if num_hard > 0:
        hard = torch.topk(pred_loss.float(), num_hard, dim=1).indices
        noise.scatter_(1, hard, -1.0)                                    # below every uniform draw
    return _mask_lowest(noise, num_masked)


def num_masked_per_frame(num_spatial: int, mask_ratio: float) -> int:
    """VideoMAE's rounding: int(r * S) masked positions per frame (176 of 196 at 0.9), where images
    floor the visible count instead (`num_masked_patches`)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio} must lie in (0, 1), e.g. --mask_ratio 0.9")
    return int(mask_ratio * num_spatial)


def tube_mask(batch_size: int, frames: int, num_spatial: int, masked_per_frame: int, *,
              device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAE's tube mask: one uniformly random set of `masked_per_frame` spatial positions per
    clip, the same at each of the `frames` temporal positions. (N, frames * S)."""
    return random_mask(batch_size, num_spatial, masked_per_frame, device=device, generator=generator).repeat(1, frames)


def hard_tube_mask(pred_loss: torch.Tensor, frames: int, masked_per_frame: int, alpha: float, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """HPM on tubes (`--hard_unit tube`): the teacher's predicted losses (N, frames * S) averaged over
    time to one score per spatial position; the int(masked_per_frame * alpha) hardest positions are
    masked, the rest of the positions uniform, the same at every temporal position (so no masked
    patch shows through its neighbours in time). (N, frames * S)."""
    spatial = pred_loss.float().view(pred_loss.shape[0], frames, -1).mean(dim=1)
    return hard_patch_mask(spatial, masked_per_frame, alpha, generator=generator).repeat(1, frames)


def tube_means(values: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-token values of a tube mask's masked tokens (N, frames * m), in ascending token order
    (so time-major), -> each tube's mean over time (N, m): what `--hard_unit tube` ranks."""
    return values.view(values.shape[0], frames, -1).mean(dim=1)


class RandomMasking:
    """MAE's mask policy: uniformly random, `num_masked` of `grid_size`^2 patches."""

    def __init__(self, grid_size: int, num_masked: int) -> None:
        self.grid_size, self.num_masked = grid_size, num_masked

    def __call__(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(batch_size, self.grid_size ** 2, self.num_masked, device=device, generator=generator)


class RegularMasking(RandomMasking):
    """UM-MAE's policy: one visible patch per 2x2 cell."""

    def __call__(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return regular_mask(batch_size, self.grid_size, device=device, generator=generator)


class BlockMasking(RandomMasking):
    """One visible square, everything else masked (the reference's block mask)."""

    def __init__(self, grid_size: int, num_masked: int) -> None:
        super().__init__(grid_size, num_masked)
        block_mask(1, grid_size, num_masked)   # raises now if L - M is not a square number

    def __call__(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return block_mask(batch_size, self.grid_size, self.num_masked, device=device, generator=generator)


MASK_POLICIES = {"random": RandomMasking, "regular": RegularMasking, "block": BlockMasking}


def mask_policy(kind: str, grid_size: int, num_masked: int) -> RandomMasking:
    """The MAE baseline's mask policy by name: random, regular or block."""
    return MASK_POLICIES[kind](grid_size, num_masked)
