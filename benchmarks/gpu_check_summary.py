"""The tables of benchmarks/gpu_check.sh, row by row as its steps end, and its summary.

    python benchmarks/gpu_check_summary.py header
    python benchmarks/gpu_check_summary.py row WORK STEP          # one step's row, from WORK/status.tsv
    python benchmarks/gpu_check_summary.py final WORK OUT PART    # OUT/gpu_check_PART.{json,md,_logs.tar.gz}

A row names the step, its exit status (and the expected one), its seconds and its figures: for
the step benchmarks images/s, MFU against the matmul peak of the same run and peak memory (HPM and,
when paired, MAE), for the loader images/s per worker count, for the decode check the final loss.
`final` exits 1 if any step ended otherwise than expected.
"""
import csv
import json
import sys
import tarfile
from pathlib import Path

HEADER = "| step | exit (expected) | seconds | figures |\n|---|---|---|---|"
DECODE_TOLERANCE = 0.05   # relative gap of the per-epoch losses under which the two decode paths agree


def steps(work: Path) -> list[dict]:
    with open(work / "status.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def bench_rows(result: dict) -> list[tuple[str, dict]]:
    """(mode, figures) of a bench_pretrain.py result: HPM, and MAE when it was paired."""
    compiled = " compiled" if result["compile"] else ""
    runs = [(result["mode"] + compiled, result)]
    if "paired_mae" in result:
        runs.append(("MAE" + compiled, result["paired_mae"]))
    return runs


def final_losses(work: Path, name: str) -> list[float]:
    log = work / name / "log.txt"
    if not log.is_file():
        return []
    return [json.loads(line)["train_recon"] for line in log.read_text().splitlines()]


def figures(work: Path, name: str) -> dict:
    """What a step measured, as a flat dict (empty for steps that only pass or fail)."""
    path = work / f"{name}.json"
    if name.startswith(("bench_vit", "bench_video")) and path.is_file():
        result = json.loads(path.read_text())
        return {f"{mode} {key}": r[key] for mode, r in bench_rows(result)
                for key in ("images_per_s", "mfu", "peak_mem_bytes", "iter_s_median")}
    if name.startswith("loader") and path.is_file():
        rates = json.loads(path.read_text())["images_per_s"]
        return {f"{workers} workers images/s": rate for workers, rate in rates.items()}
    if name.startswith("decode_"):
        losses = final_losses(work, name)
        return {"recon per epoch": losses} if losses else {}
    return {}


def describe(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if key.endswith("peak_mem_bytes"):
            parts.append(f"{key.removesuffix('peak_mem_bytes')}peak {value / 2**30:.1f} GiB")
        elif key.endswith("mfu"):
            parts.append(f"{key} {value:.3f}")
        elif key.endswith("iter_s_median"):
            parts.append(f"{key.removesuffix('iter_s_median')}{value:.4f} s/iter")
        elif key.endswith("images_per_s"):
            parts.append(f"{key.removesuffix('images_per_s')}{value:.0f} images/s")
        elif isinstance(value, list):
            parts.append(f"{key} " + " ".join(f"{v:.4f}" for v in value))
        else:
            parts.append(f"{key.replace('_', ' ')} {value:.0f}")
    return ", ".join(parts)


def row(work: Path, name: str) -> str:
    record = next(s for s in reversed(steps(work)) if s["step"] == name)
    mark = "" if record["exit"] == record["expected"] else " FAILED"
    return (f"| {name} | {record['exit']} ({record['expected']}){mark} | {record['seconds']} | "
            f"{describe(figures(work, name))} |")


def decode_check(work: Path) -> dict | None:
    pil, gpu = final_losses(work, "decode_pil"), final_losses(work, "decode_gpu_decode")
    if not pil or len(pil) != len(gpu):
        return None
    gaps = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(pil, gpu)]
    return {"pil": pil, "gpu_decode": gpu, "relative_gaps": gaps, "tolerance": DECODE_TOLERANCE,
            "agree": max(gaps) < DECODE_TOLERANCE}


def final(work: Path, out: Path, part: str) -> int:
    records = steps(work)
    failed = [s["step"] for s in records if s["exit"] != s["expected"]]
    gpu = (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").is_file() else ""
    summary = {"part": part, "machine": gpu, "steps": [{**s, "figures": figures(work, s["step"])} for s in records],
               "failed": failed, "decode_check": decode_check(work)}
    lines = [f"# gpu_check {part}", "", "```", gpu, "```", "", HEADER, *(row(work, s["step"]) for s in records)]
    if summary["decode_check"] is not None:
        check = summary["decode_check"]
        lines += ["", f"decode check: --gpu_decode and PIL losses per epoch differ by at most "
                      f"{max(check['relative_gaps']):.2%} ({'agree' if check['agree'] else 'DISAGREE'} within "
                      f"{DECODE_TOLERANCE:.0%})"]
    ablation = work / "ablation" / "results.md"
    if ablation.is_file():
        summary["ablation"] = ablation.read_text()
        lines += ["", summary["ablation"]]
    lines += ["", f"FAILED steps: {', '.join(failed)}" if failed else f"all {len(records)} steps passed"]
    text = "\n".join(lines) + "\n"
    (out / f"gpu_check_{part}.md").write_text(text)
    (out / f"gpu_check_{part}.json").write_text(json.dumps(summary, indent=2) + "\n")
    with tarfile.open(out / f"gpu_check_{part}_logs.tar.gz", "w:gz") as bundle:
        for path in sorted(work.rglob("*")):
            small = path.is_file() and path.stat().st_size < 4 * 2**20
            if small and (path.suffix in (".log", ".json", ".tsv", ".txt", ".md") or path.name == "log.txt"):
                bundle.add(path, arcname=str(path.relative_to(work)))
    print(text, end="")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["header"]:
        print(HEADER, flush=True)
        return 0
    if argv[:1] == ["row"] and len(argv) == 3:
        print(row(Path(argv[1]), argv[2]), flush=True)
        return 0
    if argv[:1] == ["final"] and len(argv) == 4:
        return final(Path(argv[1]), Path(argv[2]), argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
