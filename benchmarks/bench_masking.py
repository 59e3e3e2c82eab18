"""Hard-patch masking: the vectorised `hard_patch_mask` against a per-image Python loop in the
style of the reference implementation (NumPy delete + shuffle for each image).

    python benchmarks/bench_masking.py --batch_size 256 --num_patches 196
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.masking import hard_patch_mask, num_masked_patches  # noqa: E402


def per_image_loop(pred_loss: torch.Tensor, num_masked: int, alpha: float) -> torch.Tensor:
    """One image at a time: the top-K patches, then a NumPy shuffle of the rest."""
    n, num_patches = pred_loss.shape
    num_hard = int(num_masked * alpha)
    order = torch.argsort(pred_loss, dim=1)
    mask = torch.zeros(n, num_patches, dtype=torch.bool, device=pred_loss.device)
    for i in range(n):
        hard = order[i, num_patches - num_hard:]
        rest = np.delete(np.arange(num_patches), hard.cpu().numpy())
        np.random.shuffle(rest)
        chosen = torch.cat([hard, torch.as_tensor(rest[:num_masked - num_hard], device=pred_loss.device)])
        mask[i, chosen] = True
    return mask


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn`, each run waited for on the device (CUDA launches return at once)."""
    fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_patches", type=int, default=196)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    args = p.parse_args()
    m = num_masked_patches(args.num_patches, 0.75)
    device = torch.device(args.device)
    pred = torch.randn(args.batch_size, args.num_patches, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    vectorised = timed(lambda: hard_patch_mask(pred, m, args.alpha, generator=gen), args.repeats, device)
    loop = timed(lambda: per_image_loop(pred, m, args.alpha), max(3, args.repeats // 4), device)
    print(f"batch {args.batch_size}, L {args.num_patches}, M {m}, alpha {args.alpha}, {torch.get_num_threads()} "
          f"threads on {args.device}: vectorised {vectorised * 1e3:.2f} ms, per-image loop {loop * 1e3:.2f} ms "
          f"({loop / vectorised:.0f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch_size": args.batch_size, "num_patches": args.num_patches, "num_masked": m, "alpha": args.alpha,
            "threads": torch.get_num_threads(), "device": args.device, "vectorised_ms": vectorised * 1e3,
            "per_image_loop_ms": loop * 1e3, "speedup": loop / vectorised}, indent=1) + "\n")


if __name__ == "__main__":
    main()
