#!/usr/bin/env bash
# The GPU figures of the README's performance section, in one call.
#
#   bash bench/gpu_suite.sh OUT_DIR [PEAK_TFLOPS]      # PEAK_TFLOPS: 989 for H100/H200 SXM
#
# Writes one JSON per measurement into OUT_DIR and prints each table. ViT-B/16 at 224, bf16,
# cuDNN attention, trainable clipping (add `--clip_mode both` through EXTRA for full clipping
# too). L2P runs as on Split CIFAR-100, with its inputs built on the device from 32x32 images;
# DualPrompt as on ImageNet-R, whose inputs the host prepares. EXTRA is appended to every
# command, e.g. EXTRA="--model_name ViT-test --input_size 32 --steps 2 --warmup 1" for a dry
# run on CPU.
set -u -o pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
mkdir -p "$out"
cd "$(dirname "$0")/.."

measure() {
  local name=$1
  shift
  echo "== $name"
  # shellcheck disable=SC2086  # EXTRA holds several flags.
  python3 bench/step_benchmark.py --peak_tflops "$peak" --steps 15 --warmup 3 --clip_mode trainable \
    --dtype bfloat16 --attention_impl cudnn --json_out "$out/$name.json" "$@" ${EXTRA:-} 2>&1 |
    grep -v -E '^[IWE][0-9]{4} ' | tail -12 || failed+=("$name")
}

failed=()

l2p=(--config cifar100_l2p --source_size 32)
dual=(--config imr_dualprompt)
measure l2p_b128 "${l2p[@]}" --global_batch 128
measure l2p_b256 "${l2p[@]}" --global_batch 256
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" measure l2p_b128_no_triton_gemm "${l2p[@]}" --global_batch 128
measure dualprompt_b192 "${dual[@]}" --global_batch 192
measure dualprompt_b384 "${dual[@]}" --global_batch 384
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
