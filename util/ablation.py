"""The statistics of an ablation (main_ablation.py): each variant's mean +- std over seeds, its
paired difference to a baseline (run by run, same seed), the Markdown table and the figure.

A run's `metrics` map each name of METRICS to a number, or None where it does not apply (an MAE
encoder has no teacher).
"""
import io
import math
from pathlib import Path

from util.checkpoint import write_bytes_atomic

METRICS = {
    "knn": "kNN top-1 (%)",
    "probe": "linear-probe top-1 (%)",
    "knn_teacher": "teacher kNN top-1 (%)",
    "probe_teacher": "teacher linear-probe top-1 (%)",
    "recon": "final reconstruction loss",
}
COMPARED = ("knn", "probe")   # the differences the table shows (results.json has every metric's)


def mean_std(values: list[float]) -> dict:
    """n, mean, sample standard deviation (n - 1; None for one value) and the t statistic of the
    mean against 0 (mean / (std / sqrt(n)); None when undefined)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    t = mean / (std / math.sqrt(n)) if std else None
    return {"n": n, "mean": mean, "std": std, "t": t, "values": list(values)}


def summarize(runs: list[dict], variants: list[str], baseline: str) -> dict[str, dict]:
    """Per variant: the seeds it has, each metric's mean_std over them, and for every variant but
    the baseline, `diff_<metric>`: mean_std of (variant - baseline) over the seeds both have."""
    by_run = {(r["variant"], r["seed"]): r["metrics"] for r in runs}
    summary: dict[str, dict] = {}
    for variant in variants:
        seeds = sorted(seed for name, seed in by_run if name == variant)
        entry: dict = {"seeds": seeds}
        for metric in METRICS:
            values = [by_run[variant, s][metric] for s in seeds if by_run[variant, s].get(metric) is not None]
            entry[metric] = mean_std(values) if values else None
            if variant == baseline:
                continue
            pairs = [by_run[variant, s][metric] - by_run[baseline, s][metric] for s in seeds
                     if (baseline, s) in by_run and by_run[variant, s].get(metric) is not None
                     and by_run[baseline, s].get(metric) is not None]
            entry[f"diff_{metric}"] = mean_std(pairs) if pairs else None
        summary[variant] = entry
    return summary


def _cell(stat: dict | None, digits: int = 2, signed: bool = False, with_t: bool = False) -> str:
    if stat is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{digits}f}"
    if with_t and stat["t"] is not None:
        text += f" (t {stat['t']:.1f})"
    return text


def markdown_table(summary: dict[str, dict], flags: dict[str, str], baseline: str) -> str:
    """One row per variant: mean ± std over seeds; Δ columns: the paired difference to `baseline`
    (mean ± std over seeds, t = mean / (std / √n))."""
    header = ["variant", "flags", "seeds", METRICS["knn"], METRICS["probe"], "teacher kNN", "teacher probe",
              "final recon loss", f"Δ kNN vs {baseline}", f"Δ probe vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        diffs = ["baseline" if variant == baseline else _cell(entry.get(f"diff_{m}"), signed=True, with_t=True)
                 for m in COMPARED]
        row = [variant, f"`{flags[variant]}`" if flags[variant] else "(defaults)", str(len(entry["seeds"])),
               _cell(entry["knn"]), _cell(entry["probe"]), _cell(entry["knn_teacher"]), _cell(entry["probe_teacher"]),
               _cell(entry["recon"], digits=4), *diffs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def draw_figure(summary: dict[str, dict], curves: dict[str, dict[int, list[float]]], path: Path) -> None:
    """Left: the student's kNN and linear-probe accuracy per variant (mean ± std, one dot per seed).
    Right: the reconstruction loss per epoch, mean over seeds with a ±std band. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(summary)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for offset, (metric, colour) in zip((-0.12, 0.12), (("knn", "tab:blue"), ("probe", "tab:orange"))):
        for i, variant in enumerate(variants):
            stat = summary[variant][metric]
            if stat is None:
                continue
            x = i + offset
            acc_ax.scatter([x] * stat["n"], stat["values"], s=12, color=colour, alpha=0.5)
            acc_ax.errorbar(x, stat["mean"], yerr=stat["std"] or 0.0, fmt="o", color=colour, capsize=4,
                            label=METRICS[metric] if i == 0 else None)
    acc_ax.set_xticks(range(len(variants)), variants)
    acc_ax.set_ylabel("top-1 (%)")
    acc_ax.set_title("student encoder: mean ± std over seeds")
    acc_ax.legend(fontsize=8)
    for variant in variants:
        runs = [c for c in curves.get(variant, {}).values() if c]
        if not runs:
            continue
        length = min(len(c) for c in runs)
        values = np.array([c[:length] for c in runs])
        epochs = np.arange(length)
        mean = values.mean(0)
        line, = loss_ax.plot(epochs, mean, marker="o" if length == 1 else None, label=variant)
        if len(runs) > 1:
            std = values.std(0, ddof=1)
            loss_ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training reconstruction loss")
    loss_ax.set_title("reconstruction loss: mean ± std over seeds")
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
