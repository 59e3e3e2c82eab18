"""Patch masks for masked image modeling.

Every function returns a boolean (N, L) tensor, True = masked, on the device of its input, with
exactly `num_masked` masked patches per image. They draw from an optional `torch.Generator`
(which must live on that device), loop over no images and never read values back to the host.
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


def block_mask(batch_size: int, grid_size: int, num_masked: int, *, block_size: int | None = None,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks contiguous blocks: a random field that is constant on `block_size` squares
    (default grid // 4) is masked where it is highest; a small jitter breaks ties at the border."""
    block = block_size or max(1, grid_size // 4)
    cells = math.ceil(grid_size / block)
    coarse = torch.rand(batch_size, cells, cells, device=device, generator=generator)
    field = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :grid_size, :grid_size]
    jitter = torch.rand(batch_size, grid_size, grid_size, device=device, generator=generator) * 1e-3
    return _mask_lowest(-(field + jitter).reshape(batch_size, -1), num_masked)


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
