#!/usr/bin/env bash
# Profiles the ViT-B/16 train steps on one GPU and measures candidate speed-ups, in one call.
#
#   bash bench/gpu_profile.sh OUT_DIR [PEAK_TFLOPS]      # PEAK_TFLOPS: 989 for H100/H200 SXM
#
# Runs `bench/gpu_profile.py --mode suite` (see its docstring): L2P (batch 128) and DualPrompt
# (batch 192) profiled with jax.profiler and broken down by kernel category, part of the step and
# kernel, then variants (XLA flags, larger batches), each in its own process, until BUDGET_S
# seconds (default 480) are spent. Writes at most 8 files into OUT_DIR: summary.txt, summary.json,
# log.txt and gzipped HLO / xplane artifacts. Needs jax, flax, optax and ml_collections; TensorFlow,
# TensorFlow Datasets and clu are made unimportable, so a run proves it does without them.
#
# TINY=1 makes it a dry run (ViT-test at 32 px, small batches, XLA attention, 2 timed steps), e.g.
# `JAX_PLATFORMS=cpu TINY=1 BUDGET_S=150 bash bench/gpu_profile.sh /tmp/out`. PYTHON picks the
# interpreter (default python3); EXTRA is appended to the suite's flags (e.g. "--only base").
set -u -o pipefail
out=${1:?usage: bash bench/gpu_profile.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export GPU_PROFILE_FORBID=${GPU_PROFILE_FORBID-tensorflow,tensorflow_datasets,clu}
tiny=()
if [[ -n "${TINY:-}" ]]; then
  tiny=(--tiny)
fi

{
  echo "===== environment, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || echo "no nvidia-smi"
  "$py" - <<'EOF' 2>&1
import importlib.metadata as md, sys
print(sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "ml_collections",
             "nvidia-cudnn-cu13", "nvidia-cublas"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    pass
EOF
} >>"$out/log.txt"
tail -n +1 "$out/log.txt" | grep -v '^=====' | head -20

# shellcheck disable=SC2086  # EXTRA holds several flags.
"$py" bench/gpu_profile.py --mode suite --out "$out" --peak_tflops "$peak" --budget_s "${BUDGET_S:-480}" \
  --steps 10 --warmup 2 --trace_steps 3 "${tiny[@]}" ${EXTRA:-} 2>&1 | grep -v -E '^[IW][0-9]{4} '
