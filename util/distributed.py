"""Process-group plumbing: torchrun (env://), plain single process; NCCL on GPUs, gloo on CPU."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible: use --device cpu or auto")
    return device


def init_distributed(device: torch.device, dist_url: str = "env://",
                     timeout_min: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group that the launcher described in the environment, if any. A collective
    that does not complete within `timeout_min` minutes raises instead of waiting forever (NCCL:
    with its asynchronous error handling)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":   # one GPU per local rank; a launcher that binds one GPU per task shows it as cuda:0
        count = torch.cuda.device_count()
        if info.local_rank >= count and count != 1:
            raise UserError(f"local rank {info.local_rank} sees {count} GPUs: give each task one GPU (SLURM "
                            f"--gpus-per-task 1) or all of the node's (torchrun --nproc_per_node up to {count})")
        device = torch.device("cuda", info.local_rank if info.local_rank < count else 0)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # 2: on a timed-out collective the watchdog aborts the communicator and the waiting call raises,
        # so the loop can print its one line naming the rank (1 and 3 end the process before that)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        store = _restart_store(dist_url, info.world_size, timeout)
        if store is not None:
            dist.init_process_group(backend, store=store, world_size=info.world_size, rank=info.rank, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=dist_url, world_size=info.world_size, rank=info.rank,
                                    timeout=timeout)
    return info, device


def _restart_store(dist_url: str, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, a store of its own for each restart round (`--max-restarts`): the elastic
    agent's store outlives a round, and a restarted round that read the previous round's gloo
    addresses from it would connect to ranks that are gone."""
    if dist_url != "env://" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=False, timeout=timeout)
    return dist.PrefixStore(f"hpm/round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def reduce_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-process metrics over all processes (identity in a single process)."""
    if not is_distributed() or not stats:
        return stats
    keys = sorted(stats)
    values = all_reduce_mean(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, values.tolist()))


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def gather_in_order(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble rows sharded round-robin (rank r holds rows r, r + W, ...) into dataset order."""
    if not is_distributed():
        return local
    world = dist.get_world_size()
    per_rank = -(-total // world)
    padded = torch.zeros(per_rank, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    stacked = torch.stack(gathered, dim=1)                # (per_rank, W, ...): row j of rank r = item j*W + r
    return stacked.reshape(per_rank * world, *local.shape[1:])[:total]
