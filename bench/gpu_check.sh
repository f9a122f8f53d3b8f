#!/usr/bin/env bash
# The GPU measurements bart_jax lacks, in one go on a lent H100/H200 (about 8 minutes): bf16 train-step
# MFU (bart-base, bart-large, 512+128 tokens, largest batch that fits), XSum-shape beam-6 generation vs
# NVIDIA's 17.7 seq/s, fp32-vs-bf16 logits on a converted fixture, and whether attention uses cuDNN.
# All the work is in bench/gpu_check.py; this wrapper only installs the working tree and runs it.
#
#   bash bench/gpu_check.sh [--smoke] [gpu_check.py options]      # JSON under $OUT if set, else bench/out/
#
# It uses whatever jax is installed on the machine and installs nothing from PyPI (the machine may not
# reach it). The machine needs a CUDA build of jax -- `pip install "jax[cuda12]"` -- plus flax, optax,
# chex, numpy, ml_dtypes and safetensors; the script lists what is missing and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml_dtypes", "safetensors", "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing python modules: $missing (install jax[cuda12] and the rest first)" >&2
  exit 2
fi
# The project itself, from this working tree, without resolving dependencies (no network needed);
# if even that fails, PYTHONPATH still finds it.
"$PY" -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 \
  || echo "gpu_check: 'pip install -e .' failed; importing bart_jax from the working tree" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let one process use most of the GPU's memory, so the largest-batch search is meaningful.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
# 480 s hard stop (the stages themselves stop starting at --budget-s, 450 s by default).
exec timeout 480 "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@"
