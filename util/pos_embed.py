"""Fixed sin-cos position embeddings: MAE's 2-D layout for images, VideoMAE's 1-D table over the
flattened tokens of a clip, and their resampling to a new grid."""
import torch
from timm.layers import resample_abs_pos_embed


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) float64 positions -> (P, dim): [sin(x * w), cos(x * w)], w_i = 10000^(-i / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + g*g, D) float32 table: first D/2 channels encode the column, last D/2 the row.

    Patch k sits at row k // g, column k % g; the class-token row (when asked for) is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos table")
    k = torch.arange(grid_size * grid_size, dtype=torch.float64)
    rows, cols = torch.div(k, grid_size, rounding_mode="floor"), k % grid_size
    table = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()


def get_1d_sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) float32: the transformer's table, VideoMAE's for clips: position x,
    channel j: sin(x / 10000^(2 * (j // 2) / dim)) on even j, cos on odd j."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponents = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = positions / 10000 ** exponents[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
    return table.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of a (1, prefix + g*g, D) table to `new_grid`; unchanged if it fits."""
    old_len = pos_embed.shape[1] - num_prefix_tokens
    if old_len == new_grid[0] * new_grid[1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), num_prefix_tokens=num_prefix_tokens,
                                  interpolation="bicubic", antialias=False)
