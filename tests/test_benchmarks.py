"""The benchmark scripts run end to end on a tiny model and report what BENCHMARKS.md quotes."""
import json

import pytest

from tests.helpers import run_script

KEYS = ("iter_s_median", "images_per_s", "flops_per_iter", "achieved_flops_per_s", "matmul_peak_flops_per_s",
        "mfu", "peak_mem_bytes")


def _bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    res = run_script("benchmarks/bench_pretrain.py", "--model", "mae_vit_tiny_patch4", "--batch_size", "4",
                     "--iters", "2", "--warmup", "1", "--threads", "1", "--json", str(out), *extra)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text())


def test_pretrain_benchmark_reports_every_key_for_hpm_and_mae(tmp_path):
    hpm = _bench(tmp_path)
    mae = _bench(tmp_path, "--no-learning_loss")
    for result in (hpm, mae):
        assert all(result[k] > 0 for k in KEYS)
        assert result["iter_s_min"] <= result["iter_s_median"] <= result["iter_s_max"]
        assert len(result["iter_s_all"]) == 2 and len(result["matmul_peak_probes_flops_per_s"]) == 3
        assert result["mfu"] == pytest.approx(result["achieved_flops_per_s"] / result["matmul_peak_flops_per_s"])
    assert hpm["mode"] == "HPM" and mae["mode"] == "MAE"
    assert set(hpm["phase_s"]) == {"teacher", "masking", "forward", "backward", "optimizer", "ema"}
    assert set(mae["phase_s"]) == {"masking", "forward", "backward", "optimizer"}
    # HPM adds a loss-predictor decoder to the student and a teacher pass: clearly more work than MAE.
    assert 1.5 < hpm["flops_per_iter"] / mae["flops_per_iter"] < 3.5


def test_masking_benchmark_runs(tmp_path):
    res = run_script("benchmarks/bench_masking.py", "--batch_size", "8", "--num_patches", "16", "--repeats", "2")
    assert res.returncode == 0, res.stderr
    assert "vectorised" in res.stdout and "per-image loop" in res.stdout
