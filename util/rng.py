"""Every random number generator a run uses: seeding from (seed, rank, epoch) and saving/restoring
their states, so that a resumed run repeats an uninterrupted one."""
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed torch, numpy and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 7919 + rank) * 100_003 + epoch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: independent of the worker that loads it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def seed_epoch(seed: int, rank: int, epoch: int, generators: tuple[torch.Generator, ...] = ()) -> None:
    """Seed the global generators and the run's own (e.g. the mask generator) for one epoch."""
    value = epoch_seed(seed, rank, epoch)
    seed_all(value)
    for generator in generators:
        generator.manual_seed(value)


def rng_state(generators: tuple[torch.Generator, ...] = ()) -> dict:
    """Every RNG state of this process, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():   # this process's GPU (others are other ranks')
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: tuple[torch.Generator, ...] = ()) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if torch.cuda.is_available() and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif torch.cuda.is_available() and state.get("cuda"):   # older checkpoints: every visible GPU's
        states = state["cuda"]
        torch.cuda.set_rng_state(states[min(torch.cuda.current_device(), len(states) - 1)])
    for generator, saved in zip(generators, state.get("generators", ())):
        generator.set_state(saved)
