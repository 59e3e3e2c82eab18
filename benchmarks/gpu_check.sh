#!/usr/bin/env bash
# The GPU acceptance run, in parts that each take about 5 minutes on one H100 or H200:
#
#   bash benchmarks/gpu_check.sh bench     # ViT-B/16 HPM and MAE (paired, bf16, eager, batch 128), ViT-L/16
#                                          # HPM (batch 64), fp16 with the gradient scaler, masking, and video
#                                          # HPM paired with VideoMAE (ViT-B, 16 x 224, batch 32)
#   bash benchmarks/gpu_check.sh compile   # ViT-B/16 HPM and MAE compiled (batch 256), the cold compile timed
#   bash benchmarks/gpu_check.sh e2e       # torchrun pretraining stopped by SIGTERM and resumed, fine-tuning,
#                                          # linear probing, kNN, export, a one-epoch ablation (2 runs at once)
#   bash benchmarks/gpu_check.sh loader    # the loader alone (8 and 16 workers, --gpu_decode), and the decode
#                                          # check: --gpu_decode and the PIL path train to the same loss
#   bash benchmarks/gpu_check.sh all       # every part in turn (for machines without a per-command limit)
#
# Each step's row is printed as soon as it ends. Bulky outputs (data, checkpoints, images) stay in
# $HPM_GPU_WORK (default /tmp/hpm_gpu_check); the results go to $OUT (default
# benchmarks/results/gpu_check): gpu_check_<part>.json and .md (the summary) and
# gpu_check_<part>_logs.tar.gz (every step's log and JSON), three files per part.
# Packages a GPU node without internet lacks can travel as wheels in .whl/ (benchmarks/gpu_wheels.sh);
# when .whl/ exists they are installed first, into $HPM_GPU_WORK/site (not in the tiny CPU mode).
# HPM_GPU_CHECK_TINY=1 runs the same steps with tiny models and data on the CPU (the test suite
# does, so that the script cannot rot between GPU runs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"   # every interpreter call goes through this one (PY=/path/to/venv/bin/python to choose)
part="${1:-}"
case "$part" in
    bench|compile|e2e|loader|all) ;;
    *) echo "usage: bash benchmarks/gpu_check.sh bench|compile|e2e|loader|all" >&2; exit 2 ;;
esac
out="${OUT:-benchmarks/results/gpu_check}"
work="${HPM_GPU_WORK:-/tmp/hpm_gpu_check}/$part"
rm -rf "$work"
mkdir -p "$out" "$work"
if [ "${HPM_GPU_CHECK_TINY:-0}" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then   # the GPU machine's missing packages
    site="${HPM_GPU_WORK:-/tmp/hpm_gpu_check}/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
status="$work/status.tsv"
printf "step\texit\texpected\tseconds\n" > "$status"
summary=("$PY" benchmarks/gpu_check_summary.py)

step() {   # step NAME EXPECTED_EXIT COMMAND...: run, log to $work/NAME.log, record and print its row
    local name=$1 expected=$2 started rc
    shift 2
    started=$(date +%s)
    "$@" > "$work/$name.log" 2>&1
    rc=$?
    printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$expected" "$(( $(date +%s) - started ))" >> "$status"
    "${summary[@]}" row "$work" "$name"
}

if [ "${HPM_GPU_CHECK_TINY:-0}" = 1 ]; then
    device=cpu; amp=none; compile=(); base=mae_vit_tiny_patch4; large=mae_vit_tiny_patch4; video=videomae_vit_tiny_patch4
    video_batch=2
    small=mae_vit_tiny_patch4; classifier=vit_tiny_patch4; batches=(8 16); large_batch=8
    bench=(--iters 2 --warmup 1 --threads 1 --probe_seconds 0.1); images=(--train 64 --val 32 --classes 4 --min_size 40 --max_size 56)
    e2e=(--batch_size 8 --num_workers 1); stop_at=5; workers=(0 1); loader=(--batch_size 8 --batches 3 --input_size 32)
    ablation=(--batch_size 8 --num_workers 0 --knn_k 5 --probe_batch_size 8)
    decode=(--batch_size 8 --num_workers 1 --epochs 2)
else
    device=cuda; amp=bf16; compile=(--compile); base=mae_vit_base_patch16; large=mae_vit_large_patch16
    video=videomae_vit_base_patch16; video_batch=32
    small=mae_vit_small_patch16; classifier=vit_small_patch16; batches=(128 256); large_batch=64
    bench=(--iters 10 --warmup 3 --probe_seconds 0.25); images=(--train 4096 --val 512 --classes 10 --min_size 256 --max_size 320)
    e2e=(--batch_size 128 --num_workers 16); stop_at=20; workers=(8 16); loader=(--batch_size 256 --batches 10)
    ablation=(--batch_size 128 --num_workers 8 --probe_batch_size 256)
    decode=(--batch_size 128 --num_workers 16 --epochs 3)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
fi
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'timm', timm.__version__)" >> "$work/gpu.txt"
echo "gpu_check $part: $(tail -n 1 "$work/gpu.txt")"
"${summary[@]}" header

bench_part() {
    step "bench_vit_b_bs${batches[0]}_eager" 0 "$PY" benchmarks/bench_pretrain.py --model "$base" \
        --batch_size "${batches[0]}" --amp "$amp" --device "$device" --paired_mae "${bench[@]}" \
        --json "$work/bench_vit_b_bs${batches[0]}_eager.json"
    step "bench_vit_l_bs${large_batch}" 0 "$PY" benchmarks/bench_pretrain.py --model "$large" \
        --batch_size "$large_batch" --amp "$amp" --device "$device" "${bench[@]}" --json "$work/bench_vit_l_bs${large_batch}.json"
    step bench_vit_b_fp16 0 "$PY" benchmarks/bench_pretrain.py --model "$base" --batch_size "${batches[0]}" \
        --amp "$([ $amp = none ] && echo none || echo fp16)" --device "$device" "${bench[@]}" --json "$work/bench_vit_b_fp16.json"
    step bench_masking 0 "$PY" benchmarks/bench_masking.py --device "$device" --batch_size "${batches[1]}"
    step "bench_video_b_bs${video_batch}" 0 "$PY" benchmarks/bench_pretrain.py --model "$video" \
        --batch_size "$video_batch" --amp "$amp" --device "$device" --paired_mae "${bench[@]}" \
        --json "$work/bench_video_b_bs${video_batch}.json"
    step "bench_video_b_bs${video_batch}_ckpt" 0 "$PY" benchmarks/bench_pretrain.py --model "$video" \
        --batch_size "$video_batch" --amp "$amp" --device "$device" --grad_checkpointing "${bench[@]}" \
        --json "$work/bench_video_b_bs${video_batch}_ckpt.json"
    step "bench_vit_l_bs${large_batch}_ckpt" 0 "$PY" benchmarks/bench_pretrain.py --model "$large" \
        --batch_size "$large_batch" --amp "$amp" --device "$device" --grad_checkpointing "${bench[@]}" \
        --json "$work/bench_vit_l_bs${large_batch}_ckpt.json"
}

compile_part() {
    step "bench_vit_b_bs${batches[1]}_compile" 0 "$PY" benchmarks/bench_pretrain.py --model "$base" \
        --batch_size "${batches[1]}" --amp "$amp" --device "$device" --paired_mae "${compile[@]}" "${bench[@]}" \
        --json "$work/bench_vit_b_bs${batches[1]}_compile.json"
}

make_data() {   # make_data [--odd_files]: the loader part's data also holds ImageNet's awkward files
    data="$work/jpegs"
    [ -d "$data" ] || step make_jpegs 0 "$PY" benchmarks/make_jpeg_folder.py --root "$data" "${images[@]}" "$@"
}

e2e_part() {
    make_data
    pretrain=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 main_pretrain.py --model "$small"
              --data_path "$data" --epochs 2 --warmup_epochs 1 --amp "$amp" --device "$device" "${e2e[@]}"
              --print_freq 5 --output_dir "$work/pretrain")
    # SIGTERM at a named step: the worker saves and exits 75, which torchrun reports as a failure (1)
    step pretrain_stopped 1 env HPM_FAULT="point=step,at=$stop_at,action=SIGTERM" "${pretrain[@]}"
    step pretrain_stop_saved 0 "$PY" -c "from util.checkpoint import load_file
c = load_file('$work/pretrain/checkpoint-last.pth'); assert (c['next_epoch'], c['next_step']) == (0, $stop_at), c['next_step']"
    step pretrain_resumed 0 "${pretrain[@]}"
    weights="$work/pretrain/checkpoint-last.pth"
    step finetune 0 "$PY" main_finetune.py --model "$classifier" --finetune "$weights" --data_path "$data" \
        --epochs 1 --warmup_epochs 0 --amp "$amp" --device "$device" "${e2e[@]}" --output_dir "$work/finetune"
    step linprobe 0 "$PY" main_linprobe.py --model "$classifier" --finetune "$weights" --data_path "$data" \
        --epochs 1 --warmup_epochs 0 --amp "$amp" --device "$device" "${e2e[@]}" --output_dir "$work/linprobe"
    step knn 0 "$PY" main_knn.py --model "$classifier" --finetune "$weights" --data_path "$data" --nb_knn 10 20 \
        --device "$device" "${e2e[@]}" --output_dir "$work/knn"
    step export 0 "$PY" export.py --checkpoint "$weights" --format timm --output "$work/export_timm"
    step ablation 0 "$PY" main_ablation.py --variants hpm mae --seeds 0 --epochs 1 --warmup_epochs 0 --jobs 2 \
        --model "$small" --data_path "$data" --amp "$amp" --device "$device" --probe_epochs 1 "${ablation[@]}" \
        --output_dir "$work/ablation"
}

loader_part() {
    make_data --odd_files
    step loader_cpu 0 "$PY" benchmarks/bench_loader.py --data_path "$data" --workers "${workers[@]}" "${loader[@]}" \
        --json "$work/loader_cpu.json"
    step loader_gpu_decode 0 "$PY" benchmarks/bench_loader.py --data_path "$data" --workers "${workers[0]}" \
        "${loader[@]}" --gpu_decode --device "$device" --json "$work/loader_gpu_decode.json"
    # the decode check: the same run on the same data through nvJPEG and through PIL (crops differ by RNG,
    # so the curves agree statistically); memory overwritten by an unordered decode shows as a gap
    for path in pil gpu_decode; do
        step "decode_${path}" 0 "$PY" main_pretrain.py --model "$small" --data_path "$data" --warmup_epochs 1 \
            --amp "$amp" --device "$device" --print_freq 5 --output_dir "$work/decode_$path" --no-learning_loss \
            --bad_images skip "${decode[@]}" $([ $path = gpu_decode ] && echo --gpu_decode)
    done
}

case "$part" in
    bench) bench_part ;;
    compile) compile_part ;;
    e2e) e2e_part ;;
    loader) loader_part ;;
    all) bench_part; compile_part; e2e_part; loader_part ;;
esac
rm -rf "$work/jpegs"
"${summary[@]}" final "$work" "$out" "$part"
