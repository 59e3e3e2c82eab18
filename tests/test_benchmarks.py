"""The benchmark scripts run end to end on a tiny model and report what BENCHMARKS.md quotes."""
import json
import re
import sys

import pytest

from tests.helpers import REPO, run_script

KEYS = ("iter_s_median", "images_per_s", "flops_per_iter", "achieved_flops_per_s", "matmul_peak_flops_per_s",
        "mfu", "peak_mem_bytes")


def _bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    res = run_script("benchmarks/bench_pretrain.py", "--model", "mae_vit_tiny_patch4", "--batch_size", "4",
                     "--iters", "2", "--warmup", "1", "--threads", "1", "--json", str(out), *extra)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text())


@pytest.mark.slow
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


@pytest.mark.slow
def test_pretrain_benchmark_pairs_hpm_with_mae(tmp_path):
    result = _bench(tmp_path, "--paired_mae")
    paired = result["paired_mae"]
    assert paired["order"] == ["HPM", "MAE", "MAE", "HPM"]
    assert len(result["iter_s_all"]) == len(paired["iter_s_all"]) == 2
    assert len(result["matmul_peak_probes_flops_per_s"]) == 5
    hpm, mae = result["iter_s_all"], paired["iter_s_all"]
    assert paired["hpm_mae_ratio_all"] == pytest.approx([hpm[0] / mae[0], hpm[1] / mae[1]])
    assert 1.5 < result["flops_per_iter"] / paired["flops_per_iter"] < 3.5
    assert all(paired[k] > 0 for k in KEYS if k in paired)


def test_pretrain_benchmark_profile_splits_the_step_by_operator_class(tmp_path):
    result = _bench(tmp_path, "--profile", "--iters", "1", "--probe_seconds", "0.1")
    profile = result["profile"]
    assert profile.pop("peak_flops_per_s") > 0 and set(profile) == {"matmul", "attention", "other"}
    assert sum(part["time_share"] for part in profile.values()) == pytest.approx(1.0)
    assert profile["matmul"]["flops"] + profile["attention"]["flops"] == result["flops_per_iter"]
    assert profile["other"]["flops"] == 0 and all(part["seconds"] > 0 for part in profile.values())
    assert 0 < profile["matmul"]["of_peak"] and 0 < profile["attention"]["of_peak"]


def test_pretrain_benchmark_refuses_pairing_mae_with_mae(tmp_path):
    res = run_script("benchmarks/bench_pretrain.py", "--model", "mae_vit_tiny_patch4", "--no-learning_loss",
                     "--paired_mae", "--iters", "1")
    assert res.returncode != 0 and "--paired_mae" in res.stderr


def test_masking_benchmark_runs(tmp_path):
    res = run_script("benchmarks/bench_masking.py", "--batch_size", "8", "--num_patches", "16", "--repeats", "2")
    assert res.returncode == 0, res.stderr
    assert "vectorised" in res.stdout and "per-image loop" in res.stdout


@pytest.mark.parametrize("needs_grad", [False, True])
def test_flop_count_includes_fused_attention(needs_grad):
    """The fused attention kernel counts as many FLOPs as timm's unfused matmul-softmax-matmul path."""
    import torch
    from timm.models.vision_transformer import Attention

    from benchmarks.bench_pretrain import count_flops
    attn = Attention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 17, 32, requires_grad=needs_grad)

    def step():
        y = attn(x)
        if needs_grad:
            y.sum().backward()

    counts = {}
    for fused in (True, False):
        attn.fused_attn = fused
        counts[fused] = count_flops(step)
    qkv_and_proj = 2 * 2 * 17 * 32 * (3 * 32 + 32) * (3 if needs_grad else 1)
    assert counts[True] == counts[False] > qkv_and_proj


def test_flop_count_of_cuda_attention_backward_leaves_out_the_recomputation():
    """The CUDA flash kernel's backward counts the four gradient products (fake tensors: no GPU needed)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import sdpa_flop_count

    from benchmarks.bench_pretrain import count_flops
    aten = torch.ops.aten
    with FakeTensorMode():
        q = k = v = torch.empty(2, 4, 17, 8, device="cuda", dtype=torch.bfloat16)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v)
        flops = count_flops(lambda: aten._scaled_dot_product_flash_attention_backward(
            out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset))
    assert flops == 2 * sdpa_flop_count(q.shape, k.shape, v.shape) > 0


GPU_CHECK_STEPS = {
    "bench": ["bench_vit_b_bs8_eager", "bench_vit_l_bs8", "bench_vit_b_fp16", "bench_masking", "bench_video_b_bs2",
              "bench_video_b_bs2_ckpt", "bench_vit_l_bs8_ckpt"],
    "compile": ["bench_vit_b_bs16_compile"],
    "e2e": ["make_jpegs", "pretrain_stopped", "pretrain_stop_saved", "pretrain_resumed", "finetune", "linprobe", "knn",
            "export", "ablation"],
    "loader": ["make_jpegs", "loader_cpu", "loader_gpu_decode", "decode_pil", "decode_gpu_decode"],
}


@pytest.mark.slow
@pytest.mark.parametrize("part", GPU_CHECK_STEPS)
def test_gpu_acceptance_part_passes_in_its_tiny_cpu_mode_and_fits_what_comes_back(tmp_path, part):
    """benchmarks/gpu_check.sh PART with HPM_GPU_CHECK_TINY=1: every step ends as expected, each row is
    printed as its step ends, and what it leaves under $OUT fits what the GPU machine sends back (at
    most 8 files, each under 16 MiB, at most two folders down): the summary and one bundle of logs."""
    import os
    import subprocess
    import tarfile

    from tests.helpers import REPO
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "HPM_GPU_CHECK_TINY": "1", "OUT": str(out), "HPM_GPU_WORK": str(work),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), part], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    names = [line.split(" | ")[0].removeprefix("| ") for line in res.stdout.splitlines() if line.startswith("| ")]
    assert names[1:1 + len(GPU_CHECK_STEPS[part])] == GPU_CHECK_STEPS[part]    # the rows, in order, as they ended
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == [f"gpu_check_{part}.json", f"gpu_check_{part}.md",
                                             f"gpu_check_{part}_logs.tar.gz"]
    assert all(p.stat().st_size < 16 * 2**20 and len(p.relative_to(out).parts) <= 3 for p in files)
    summary = json.loads((out / f"gpu_check_{part}.json").read_text())
    assert not summary["failed"] and [s["step"] for s in summary["steps"]] == GPU_CHECK_STEPS[part]
    with tarfile.open(out / f"gpu_check_{part}_logs.tar.gz") as bundle:
        members = bundle.getnames()
    assert "status.tsv" in members and all(f"{name}.log" in members for name in GPU_CHECK_STEPS[part])
    assert f"all {len(GPU_CHECK_STEPS[part])} steps passed" in res.stdout
    if part == "bench":
        assert summary["steps"][0]["figures"]["MAE peak_mem_bytes"] > 0
        assert re.search(r"\| bench_vit_b_bs8_eager \| 0 \(0\) \| \d+ \| HPM \d+ images/s, .*MAE \d+ images/s",
                         res.stdout)
    if part == "e2e":
        assert (work / part / "export_timm" / "model.safetensors").is_file()
        ablation = json.loads((work / part / "ablation" / "results.json").read_text())
        assert [r["variant"] for r in ablation["runs"]] == ["hpm", "mae"] and ablation["evaluation"]["amp"] == "none"
    if part == "loader":
        check = summary["decode_check"]
        assert len(check["pil"]) == len(check["gpu_decode"]) == 2 and "decode check" in res.stdout


def test_loader_benchmark_times_every_source_on_the_same_images(tmp_path):
    res = run_script("benchmarks/make_jpeg_folder.py", "--root", str(tmp_path / "jpegs"), "--train", "24", "--val", "0",
                     "--classes", "3", "--min_size", "40", "--max_size", "48")
    assert res.returncode == 0, res.stderr
    res = run_script("benchmarks/bench_loader.py", "--data_path", str(tmp_path / "jpegs"), "--workers", "0", "1",
                     "--sources", "reference", "folder", "shards", "hf", "--batch_size", "4", "--batches", "2",
                     "--warmup", "1", "--input_size", "32", "--json", str(tmp_path / "loader.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "loader.json").read_text())
    assert set(result["sources"]) == {"reference", "folder", "shards", "hf"}
    for figures in result["sources"].values():
        assert set(figures["images_per_s"]) == {"0", "1"} and figures["workers_for_goal"] > 0


@pytest.mark.slow
def test_pretrain_benchmark_takes_the_video_presets(tmp_path):
    """Video HPM paired with VideoMAE on clips (N, 3, T, H, W): FLOPs, MFU, the teacher's share."""
    out = tmp_path / "video.json"
    res = run_script("benchmarks/bench_pretrain.py", "--model", "videomae_vit_tiny_patch4", "--batch_size", "2",
                     "--iters", "2", "--warmup", "1", "--threads", "1", "--probe_seconds", "0.1", "--paired_mae",
                     "--json", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert all(result[k] > 0 for k in KEYS) and result["phase_s"]["teacher"] > 0
    assert result["paired_mae"]["flops_per_iter"] < result["flops_per_iter"]


def test_video_decode_benchmark_times_each_decoder_on_the_same_clips(tmp_path):
    from util.video import torchcodec_error
    res = run_script("benchmarks/bench_video_decode.py", "--clips", "2", "--rounds", "1", "--seconds", "1",
                     "--json", str(tmp_path / "decode.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "decode.json").read_text())
    assert set(result["datasets"]) == {"k400_h264", "ssv2_vp9"}
    for entry in result["datasets"].values():
        decoders = {"pyav"} | ({"torchcodec"} if torchcodec_error() is None else set())
        assert set(entry["ms_per_clip"]) == decoders and all(t > 0 for t in entry["ms_per_clip"].values())
        if "torchcodec" in decoders:
            assert entry["max_abs_frame_difference"] == 0 and entry["torchcodec_speedup"] > 0


def test_same_seed_check_names_every_difference():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from same_seed_check import RUNS, differences
    base = {name: {"losses": [{"train_total": 1.0, "train_recon": 0.5}], "mask_sha256": "a",
                   "knn": {"k10_acc1": 50.0, "k20_acc1": 51.0}} for name in RUNS}
    assert differences(base, json.loads(json.dumps(base))) == []
    changed = json.loads(json.dumps(base))
    changed["image_hpm"]["losses"][0]["train_total"] = 1.0 + 1e-4
    changed["videomae"]["mask_sha256"] = "b"
    changed["video_hpm_token"]["knn"]["k20_acc1"] = 52.0
    del changed["image_mae"]
    found = differences(base, changed)
    assert len(found) == 4 and found[0].startswith("image_hpm epoch 0 train_total: 1.0 before")
    assert "image_mae: missing in this run" in found and "videomae: the masks differ" in found
