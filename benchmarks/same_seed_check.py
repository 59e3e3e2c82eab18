"""The numbers a refactor must keep: the built-in image HPM, image MAE, video HPM (both hard units) and
VideoMAE runs, two epochs each on one thread in fp32, with the same seed: their per-epoch losses, the
masks the final teacher (or mask policy) draws for a fixed batch, and the final encoder's kNN accuracy.

    python benchmarks/same_seed_check.py --json before.json                 # on the code before a change
    python benchmarks/same_seed_check.py --json after.json --compare before.json

`--compare` prints every value that differs and exits 1 if any does (losses to 1e-6 relative; masks and
kNN exactly), so "behaviour unchanged" is one command's answer.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {   # name -> (pretraining model, flags, kNN classifier)
    "image_hpm": ("mae_vit_tiny_patch4", [], "vit_tiny_patch4"),
    "image_mae": ("mae_vit_tiny_patch4", ["--no-learning_loss"], "vit_tiny_patch4"),
    "video_hpm_tube": ("videomae_vit_tiny_patch4", ["--mask_unit", "tube"], "video_vit_tiny_patch4"),
    "video_hpm_token": ("videomae_vit_tiny_patch4", ["--mask_unit", "token"], "video_vit_tiny_patch4"),
    "videomae": ("videomae_vit_tiny_patch4", ["--no-learning_loss"], "video_vit_tiny_patch4"),
}
LOSS_KEYS = ("train_total", "train_recon", "train_loss_pred")


def run(script: str, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(argv)} failed: {done.stderr.strip()[-800:]}")


def mask_digest(checkpoint: Path, model: str) -> str:
    """SHA-256 of the masks that the final checkpoint's teacher (HPM) or random policy (MAE) draws for a
    fixed batch of inputs with a fixed generator, at the last epoch's hard-patch share."""
    import torch

    import models_hpm
    from util.checkpoint import load_file
    student = models_hpm.load_pretrain_model(str(checkpoint), model).eval()
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, student.patch_embed.num_frames, 32, 32) if student.video else (4, 3, 32, 32)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if student.learning_loss and isinstance(load_file(checkpoint, "--checkpoint", mmap=True).get("teacher"), dict):
            teacher = models_hpm.load_pretrain_model(str(checkpoint), model, teacher=True).eval()
            mask = student.hard_mask(teacher.predict_losses(inputs), 0.5, generator)
        else:
            mask = student.random_mask(4, inputs.device, generator)
    return hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest()


def measure(root: Path, epochs: int) -> dict:
    results = {}
    for name, (model, flags, classifier) in RUNS.items():
        out = root / name
        run("main_pretrain.py", "--model", model, *flags, "--epochs", str(epochs), "--num_workers", "0",
            "--seed", "0", "--output_dir", str(out))
        records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
        knn = root / f"{name}_knn"
        run("main_knn.py", "--model", classifier, "--finetune", str(out / "checkpoint-last.pth"), "--num_workers", "0",
            "--nb_knn", "10", "20", "--output_dir", str(knn))
        knn_record = json.loads((knn / "log_knn.txt").read_text().splitlines()[-1])
        results[name] = {"losses": [{k: r[k] for k in LOSS_KEYS if k in r} for r in records],
                         "mask_sha256": mask_digest(out / "checkpoint-last.pth", model),
                         "knn": {k: knn_record[k] for k in ("k10_acc1", "k20_acc1")}}
        print(json.dumps({name: results[name]}), flush=True)
    return results


def differences(before: dict, after: dict) -> list[str]:
    found = []
    for name in RUNS:
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            found.append(f"{name}: missing in {'the baseline' if a is None else 'this run'}")
            continue
        for epoch, (x, y) in enumerate(zip(a["losses"], b["losses"])):
            for key in sorted(set(x) | set(y)):
                if key not in x or key not in y or not math.isclose(x[key], y[key], rel_tol=1e-6, abs_tol=1e-9):
                    found.append(f"{name} epoch {epoch} {key}: {x.get(key)} before, {y.get(key)} now")
        if len(a["losses"]) != len(b["losses"]):
            found.append(f"{name}: {len(a['losses'])} epochs before, {len(b['losses'])} now")
        if a["mask_sha256"] != b["mask_sha256"]:
            found.append(f"{name}: the masks differ")
        if a["knn"] != b["knn"]:
            found.append(f"{name}: kNN {a['knn']} before, {b['knn']} now")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="pretraining epochs of each run")
    p.add_argument("--json", default=None, help="write the measured values here")
    p.add_argument("--compare", default=None, help="a --json file of an earlier measurement to compare with")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="same_seed_") as scratch:
        results = {"epochs": args.epochs, "runs": measure(Path(scratch), args.epochs)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        found = differences(json.loads(Path(args.compare).read_text())["runs"], results["runs"])
        print("\n".join(found) if found else f"the same as {args.compare}: losses, masks and kNN of every run")
        raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
