#!/usr/bin/env bash
# The GPU measurements, in one go of about 8 minutes on a lent H100/H200 (docs/gpu.md): the bf16 pretraining
# step of configs/base.yaml and configs/large.yaml (MFU, HBM), cuDNN vs XLA attention, bf16-vs-fp32 logits,
# XSum-shape beam search, and Hugging Face PyTorch BART beside each on the same GPU.
# All the work is in bench/gpu_check.py; this wrapper installs what travels with the tree and runs it.
#
#   bash bench/gpu_check.sh [--smoke] [gpu_check.py options]   # JSON: $OUT/gpu_check.json, else bench/out/
#
# Nothing is fetched: the machine has no network and no package index. The project and the wheels in
# bench/wheels/ go into a directory of their own (pip --no-index --no-deps --no-build-isolation --target);
# everything else comes from the machine's python ($PYTHON, default python3). gpu_check.py's preflight
# names every missing module in one line and stops; so does a JAX backend that is not a GPU, unless --smoke.
set -euo pipefail

# All in one function, read whole before it runs: a checkout updated during a run cannot change the rest of it.
main() {
  cd "$(dirname "$0")/.."
  PY=${PYTHON:-python3}
  OUT_DIR=${OUT:-bench/out}
  mkdir -p "$OUT_DIR"

  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  # The project installed as its wheel installs it (configs/ is the package bart_jax.configs), built by the
  # machine's setuptools from a clean copy of the tree (nothing is written into the checkout), with the wheels
  # from bench/wheels/, into a directory of its own: no index, no build isolation, no dependencies resolved.
  mkdir "$WORK/src"
  cp pyproject.toml README.md "$WORK/src/"
  cp -R bart_jax configs "$WORK/src/"
  if ! log=$("$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$WORK/site" "$WORK/src" bench/wheels/*.whl 2>&1); then
    echo "gpu_check: error: installing the project and bench/wheels/ failed (it needs pip and setuptools):" \
      "$(printf '%s\n' "$log" | grep -v '^[[:space:]]*$' | tail -n 1)" >&2
    exit 2
  fi
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  # The measuring children may use most of the GPU's memory, so the largest-batch search means something.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
  # A hard stop past the stages' own budget (--budget-s, 450 s by default).
  status=0
  timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@" || status=$?
  exit "$status"
}
main "$@"
