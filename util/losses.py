"""Pretraining objectives (spec section 2), computed in fp32."""
import torch


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        norm_pix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error on masked patches. pred, target: (N, M, P) -> (scalar mean, per-patch (N, M))."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return per_patch.mean(), per_patch


def relative_loss_prediction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HPM's ranking objective over all ordered pairs of masked patches of each image.

    For s_ij = pred_j - pred_i: -log(sigmoid(s_ij) + 1e-6) where l_j > l_i,
    -log(1 - sigmoid(s_ij) + 1e-6) where l_j < l_i, nothing on ties; the sum is divided by the
    number of untied pairs. pred, target: (N, M); target is detached here.
    """
    pred, target = pred.float(), target.detach().float()
    prob = torch.sigmoid(pred.unsqueeze(1) - pred.unsqueeze(2))          # [n, i, j] = sigmoid(p_j - p_i)
    diff = target.unsqueeze(1) - target.unsqueeze(2)                     # [n, i, j] = l_j - l_i
    terms = torch.where(diff > 0, -torch.log(prob + 1e-6),
                        torch.where(diff < 0, -torch.log(1 - prob + 1e-6), torch.zeros_like(prob)))
    return terms.sum() / (diff != 0).sum().clamp_min(1)


def relative_loss_prediction_chunked(pred: torch.Tensor, target: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """`relative_loss_prediction` with its (N, M, M) pair tensors made `rows` rows of i at a time,
    each chunk recomputed in the backward pass instead of kept: memory O(N * rows * M) instead of
    O(N * M * M), for the 1408 x 1408 token pairs of a video clip. Equal to the unchunked objective."""
    from torch.utils.checkpoint import checkpoint
    pred, target = pred.float(), target.detach().float()

    def chunk(pred_rows: torch.Tensor, target_rows: torch.Tensor, pred_all: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(pred_all.unsqueeze(1) - pred_rows.unsqueeze(2))
        diff = target.unsqueeze(1) - target_rows.unsqueeze(2)
        terms = torch.where(diff > 0, -torch.log(prob + 1e-6),
                            torch.where(diff < 0, -torch.log(1 - prob + 1e-6), torch.zeros_like(prob)))
        return terms.sum()

    total = pred.new_zeros(())
    untied = torch.zeros((), dtype=torch.long, device=pred.device)
    for start in range(0, pred.shape[1], rows):
        stop = start + rows
        total = total + checkpoint(chunk, pred[:, start:stop], target[:, start:stop], pred, use_reentrant=False)
        untied = untied + (target.unsqueeze(1) != target[:, start:stop].unsqueeze(2)).sum()
    return total / untied.clamp_min(1)


def tubelet_normalised_target(tubelets: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """VideoMAE's normalised target: (N, L, t*p*p*C) pixels in [0, 1] (channel last) -> each channel
    of each tubelet standardised on its own t*p*p values, (x - mean) / (unbiased std + 1e-6). Unlike
    MAE's image norm-pix (one mean/var per patch over all values, eps inside the square root)."""
    x = tubelets.float().unflatten(-1, (-1, channels))
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.std(dim=-2, keepdim=True) + 1e-6)
    return x.flatten(-2)


def absolute_loss_prediction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE to the per-image standardised loss (mean, unbiased var, eps 1e-6). (N, M) inputs."""
    target = target.detach().float()
    target = (target - target.mean(dim=1, keepdim=True)) / (target.var(dim=1, keepdim=True) + 1e-6) ** 0.5
    return (pred.float() - target).pow(2).mean()


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature targets: per masked patch the squared distance of the L2-normalised prediction and
    target, summed over the feature dimension. (N, M, C) -> (scalar mean, per-patch (N, M))."""
    pred = torch.nn.functional.normalize(pred.float(), dim=-1)
    target = torch.nn.functional.normalize(target.detach().float(), dim=-1)
    per_patch = (pred - target).pow(2).sum(dim=-1)
    return per_patch.mean(), per_patch
