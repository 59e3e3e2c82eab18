"""README's image quick start over several seeds: pretraining on the built-in digits, then kNN, linear
probing and fine-tuning of its encoder, each with its defaults; prints seed-by-seed and mean +- std
top-1 and writes them as JSON.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 --output_dir /tmp/quickstart_seeds \\
        --json benchmarks/results/quickstart_seeds.json
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def last_record(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


def run(script: str, *argv: str) -> float:
    started = time.time()
    subprocess.run([sys.executable, str(REPO / script), *argv], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.time() - started


def one_seed(seed: int, root: Path) -> dict:
    pre, knn, lp, ft = (root / f"seed_{seed}" / name for name in ("pretrain", "knn", "linprobe", "finetune"))
    weights = str(pre / "checkpoint-last.pth")
    times = {"pretrain": run("main_pretrain.py", "--seed", str(seed), "--output_dir", str(pre))}
    times["knn"] = run("main_knn.py", "--finetune", weights, "--output_dir", str(knn))
    times["linprobe"] = run("main_linprobe.py", "--finetune", weights, "--seed", str(seed), "--output_dir", str(lp))
    times["finetune"] = run("main_finetune.py", "--finetune", weights, "--seed", str(seed), "--output_dir", str(ft))
    knn_record, lp_record, ft_record = last_record(knn / "log_knn.txt"), last_record(lp / "log.txt"), \
        last_record(ft / "log.txt")
    return {"seed": seed, "knn_k20": knn_record["k20_acc1"], "knn_k10": knn_record["k10_acc1"],
            "linprobe_last": lp_record["test_acc1"], "linprobe_best": lp_record["best_acc1"],
            "finetune_last": ft_record["test_acc1"], "finetune_best": ft_record["best_acc1"],
            "seconds": {k: round(v, 1) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default="output_quickstart_seeds", help="one folder per seed and command")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(seed, Path(args.output_dir)))
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for key in ("knn_k20", "knn_k10", "linprobe_last", "linprobe_best", "finetune_last", "finetune_best"):
        values = [row[key] for row in rows]
        summary[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(f"{key}: {summary[key]['mean']:.2f} +- {summary[key]['std']:.2f} over seeds {args.seeds}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "seeds": rows, "summary": summary},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
