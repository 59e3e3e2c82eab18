"""The summary table of benchmarks/gpu_check.sh: every step's exit status, the step benchmarks
(s/iter, images/s, MFU against the matmul peak of the same run, peak memory), the loader's
images/s against the step's, the ablation's table. Exits 1 if any step ended otherwise than expected.

    python benchmarks/gpu_check_summary.py benchmarks/results/gpu_check
"""
import csv
import json
import sys
from pathlib import Path


def main(out: Path) -> int:
    with open(out / "status.tsv") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    failed = [s["step"] for s in steps if s["exit"] != s["expected"]]
    print("| step | exit | expected | seconds |\n|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['exit']} | {s['expected']} | {s['seconds']} |")
    print("\n| benchmark | mode | batch | s / iter | images / s | MFU | peak memory GiB |\n|---|---|---|---|---|---|---|")
    fastest_step = 0.0
    for path in sorted(out.glob("bench_*.json")):
        result = json.loads(path.read_text())
        runs = [(result["mode"], result)] + ([("MAE", result["paired_mae"])] if "paired_mae" in result else [])
        for mode, r in runs:
            fastest_step = max(fastest_step, r["images_per_s"]) if mode == "HPM" else fastest_step
            print(f"| {path.stem} | {mode}{' compiled' if result['compile'] else ''} | {result['batch_size']} | "
                  f"{r['iter_s_median']:.4f} | {r['images_per_s']:.0f} | {r['mfu']:.3f} | "
                  f"{result['peak_mem_bytes'] / 2**30:.1f} |")
    for name in ("loader_cpu", "loader_gpu_decode"):
        path = out / f"{name}.json"
        if path.is_file():
            for workers, rate in json.loads(path.read_text())["images_per_s"].items():
                print(f"\n{name}, {workers} workers: {rate:.0f} images/s (fastest HPM step: {fastest_step:.0f})", end="")
    print()
    ablation = out / "ablation" / "results.md"
    if ablation.is_file():
        print("\n" + ablation.read_text())
    if failed:
        print(f"FAILED steps: {', '.join(failed)} (logs in {out})")
        return 1
    print(f"all {len(steps)} steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
