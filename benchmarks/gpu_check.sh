#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run (about 4 minutes on one H200):
# ViT-B/16 HPM at bf16, batch 128, eager and torch.compile; MAE for the HPM/MAE ratio; masking.
# Results go to $OUT (the device tool's folder) or ./benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
common=(--model mae_vit_base_patch16 --batch_size 128 --amp bf16 --iters 20 --warmup 5)
python benchmarks/bench_pretrain.py "${common[@]}" --json "$out/gpu_vit_b_bs128_bf16_hpm.json"
python benchmarks/bench_pretrain.py "${common[@]}" --no-learning_loss --json "$out/gpu_vit_b_bs128_bf16_mae.json"
python benchmarks/bench_pretrain.py "${common[@]}" --compile --warmup 8 --json "$out/gpu_vit_b_bs128_bf16_hpm_compile.json"
python benchmarks/bench_masking.py --device cuda --batch_size 256 | tee "$out/gpu_masking.txt"
