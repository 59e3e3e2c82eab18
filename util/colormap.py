"""A perceptually ordered colour map (viridis' anchor colours, linearly interpolated) for loss maps,
without matplotlib, so that tensorboard pictures and visualize.py's figures share one scale."""
import torch

VIRIDIS_ANCHORS = ((0x44, 0x01, 0x54), (0x3b, 0x52, 0x8b), (0x21, 0x91, 0x8c), (0x5e, 0xc9, 0x62), (0xfd, 0xe7, 0x25))


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """(..., ) values in [0, 1] -> (..., 3) RGB in [0, 1]."""
    anchors = torch.tensor(VIRIDIS_ANCHORS, dtype=torch.float32, device=values.device) / 255.0
    pos = values.float().clamp(0, 1) * (len(VIRIDIS_ANCHORS) - 1)
    low = pos.floor().long().clamp(max=len(VIRIDIS_ANCHORS) - 2)
    frac = (pos - low).unsqueeze(-1)
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def normalise_per_image(maps: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> each map rescaled to [0, 1] by its own minimum and maximum."""
    flat = maps.float().flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-12)).view_as(maps)
