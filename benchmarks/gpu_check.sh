#!/usr/bin/env bash
# The GPU acceptance run, in one go (about 8 minutes on one H200, estimated):
#  1. step benchmarks: ViT-B/16 HPM and MAE (paired) at bf16, batch 128 and 256, eager and
#     torch.compile; ViT-L/16 HPM at batch 64; fp16 with the gradient scaler once; masking;
#  2. end to end on a synthetic JPEG ImageFolder: torchrun (NCCL) pretraining with --compile,
#     stopped by SIGTERM and resumed, then fine-tuning, linear probing, kNN and the export; a
#     one-epoch ablation (hpm and mae, 2 runs at once on the GPU, each evaluated);
#  3. the pretraining loader alone (8 and 16 workers, and the --gpu_decode path).
# Every step's exit status lands in status.tsv and a summary table is printed at the end.
# Results: $OUT (the device tool's folder) or benchmarks/results/gpu_check.
# HPM_GPU_CHECK_TINY=1 runs the same steps with tiny models and data on the CPU (the test suite
# does, so that the script cannot rot between GPU runs).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$out"
status="$out/status.tsv"
printf "step\texit\texpected\tseconds\n" > "$status"

step() {   # step NAME EXPECTED_EXIT COMMAND...: run, log to $out/NAME.log, record the exit status
    local name=$1 expected=$2 started rc
    shift 2
    started=$(date +%s)
    "$@" > "$out/$name.log" 2>&1
    rc=$?
    printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$expected" "$(( $(date +%s) - started ))" >> "$status"
    echo "$name: exit $rc (expected $expected)"
}

if [ "${HPM_GPU_CHECK_TINY:-0}" = 1 ]; then
    device=cpu; amp=none; compile=(); base=mae_vit_tiny_patch4; large=mae_vit_tiny_patch4
    small=mae_vit_tiny_patch4; classifier=vit_tiny_patch4; batches=(8 16); large_batch=8
    bench=(--iters 2 --warmup 1 --threads 1 --probe_seconds 0.1); images=(--train 64 --val 32 --classes 4 --min_size 40 --max_size 56)
    e2e=(--batch_size 8 --num_workers 1); stop_at=5; workers=(0 1); loader=(--batch_size 8 --batches 3 --input_size 32)
    ablation=(--batch_size 8 --num_workers 0 --knn_k 5 --probe_batch_size 8)
else
    device=cuda; amp=bf16; compile=(--compile); base=mae_vit_base_patch16; large=mae_vit_large_patch16
    small=mae_vit_small_patch16; classifier=vit_small_patch16; batches=(128 256); large_batch=64
    bench=(--iters 10 --warmup 3); images=(--train 4096 --val 512 --classes 10 --min_size 256 --max_size 320)
    e2e=(--batch_size 128 --num_workers 16); stop_at=20; workers=(8 16); loader=(--batch_size 256 --batches 10)
    ablation=(--batch_size 128 --num_workers 8 --probe_batch_size 256)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
fi
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$out/gpu.txt"

# 1. step benchmarks
for b in "${batches[@]}"; do
    step "bench_vit_b_bs${b}_eager" 0 python benchmarks/bench_pretrain.py --model "$base" --batch_size "$b" \
        --amp "$amp" --device "$device" --paired_mae "${bench[@]}" --json "$out/bench_vit_b_bs${b}_eager.json"
done
step "bench_vit_b_bs${batches[1]}_compile" 0 python benchmarks/bench_pretrain.py --model "$base" \
    --batch_size "${batches[1]}" --amp "$amp" --device "$device" --paired_mae "${compile[@]}" "${bench[@]}" \
    --json "$out/bench_vit_b_bs${batches[1]}_compile.json"
step "bench_vit_l_bs${large_batch}" 0 python benchmarks/bench_pretrain.py --model "$large" \
    --batch_size "$large_batch" --amp "$amp" --device "$device" "${bench[@]}" --json "$out/bench_vit_l_bs${large_batch}.json"
step bench_vit_b_fp16 0 python benchmarks/bench_pretrain.py --model "$base" --batch_size "${batches[0]}" \
    --amp "$([ $amp = none ] && echo none || echo fp16)" --device "$device" "${bench[@]}" --json "$out/bench_vit_b_fp16.json"
step bench_masking 0 python benchmarks/bench_masking.py --device "$device" --batch_size "${batches[1]}"

# 2. end to end on synthetic JPEGs
data="$out/jpegs"
rm -rf "$data" "$out/pretrain" "$out/finetune" "$out/linprobe" "$out/knn" "$out/export_timm" "$out/ablation"
step make_jpegs 0 python benchmarks/make_jpeg_folder.py --root "$data" "${images[@]}"
pretrain=(torchrun --standalone --nproc_per_node=1 main_pretrain.py --model "$small" --data_path "$data"
          --epochs 2 --warmup_epochs 1 --amp "$amp" --device "$device" "${compile[@]}" "${e2e[@]}"
          --print_freq 5 --output_dir "$out/pretrain")
# SIGTERM at a named step: the worker saves and exits 75, which torchrun reports as a failure (1)
step pretrain_stopped 1 env HPM_FAULT="point=step,at=$stop_at,action=SIGTERM" "${pretrain[@]}"
step pretrain_stop_saved 0 python -c "from util.checkpoint import load_file
c = load_file('$out/pretrain/checkpoint-last.pth'); assert (c['next_epoch'], c['next_step']) == (0, $stop_at), c['next_step']"
step pretrain_resumed 0 "${pretrain[@]}"
weights="$out/pretrain/checkpoint-last.pth"
step finetune 0 python main_finetune.py --model "$classifier" --finetune "$weights" --data_path "$data" \
    --epochs 1 --warmup_epochs 0 --amp "$amp" --device "$device" "${e2e[@]}" --output_dir "$out/finetune"
step linprobe 0 python main_linprobe.py --model "$classifier" --finetune "$weights" --data_path "$data" \
    --epochs 1 --warmup_epochs 0 --amp "$amp" --device "$device" "${e2e[@]}" --output_dir "$out/linprobe"
step knn 0 python main_knn.py --model "$classifier" --finetune "$weights" --data_path "$data" --nb_knn 10 20 \
    --device "$device" "${e2e[@]}" --output_dir "$out/knn"
step export 0 python export.py --checkpoint "$weights" --format timm --output "$out/export_timm"
step ablation 0 python main_ablation.py --variants hpm mae --seeds 0 --epochs 1 --warmup_epochs 0 --jobs 2 \
    --model "$small" --data_path "$data" --amp "$amp" --device "$device" --probe_epochs 1 "${ablation[@]}" \
    --output_dir "$out/ablation"

# 3. the loader alone
step loader_cpu 0 python benchmarks/bench_loader.py --data_path "$data" --workers "${workers[@]}" "${loader[@]}" \
    --json "$out/loader_cpu.json"
step loader_gpu_decode 0 python benchmarks/bench_loader.py --data_path "$data" --workers "${workers[0]}" \
    "${loader[@]}" --gpu_decode --device "$device" --json "$out/loader_gpu_decode.json"
rm -rf "$data"

python benchmarks/gpu_check_summary.py "$out"
