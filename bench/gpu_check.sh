#!/usr/bin/env bash
# The GPU measurements, in one go of about 8 minutes on a lent H100/H200 (docs/gpu.md): the bf16 pretraining
# step of configs/base.yaml and configs/large.yaml (MFU, HBM), cuDNN vs XLA attention, bf16-vs-fp32 logits,
# XSum-shape beam search, and Hugging Face PyTorch BART beside each on the same GPU.
# All the work is in bench/gpu_check.py; this wrapper installs what travels with the tree and runs it.
#
#   bash bench/gpu_check.sh [--smoke] [gpu_check.py options]   # JSON: $OUT/gpu_check.json, else bench/out/
#
# Nothing is fetched or built: the machine has no network and no package index. The wheels in bench/wheels/
# go into a directory of their own (pip --no-index --no-deps --target), the working tree goes on PYTHONPATH,
# and everything else comes from the machine's python ($PYTHON, default python3). gpu_check.py's preflight
# names every missing module in one line and stops; so does a JAX backend that is not a GPU, unless --smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"

SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" bench/wheels/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The measuring children may use most of the GPU's memory, so the largest-batch search means something.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# A hard stop past the stages' own budget (--budget-s, 450 s by default).
status=0
timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@" || status=$?
exit "$status"
