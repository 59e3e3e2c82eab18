"""LARS for linear probing (MAE's protocol): layer-wise trust ratio on matrices only."""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each parameter of 2+ dimensions (weight decay added
    first) is rescaled to `trust_coefficient * ||p|| / ||update||`; biases, norm parameters and
    other 1-D tensors get neither weight decay nor rescaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update * ratio
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
