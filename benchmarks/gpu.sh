#!/usr/bin/env bash
# GPU throughput check, under 5 minutes: fp32 / bf16 / fp16, channels_last off/on, torch.compile off/on,
# for the default CNN, the tiny model and the default CNN at 64x64 (see benchmarks/throughput.py).
#
#   bash benchmarks/gpu.sh                 # from the repository root, with a CUDA build of torch in .venv
#   OUT=/some/dir bash benchmarks/gpu.sh   # also writes the table to $OUT/gpu_results.txt
#   bash benchmarks/gpu.sh --quick --precisions fp32   # extra arguments go to throughput.py (CPU works too)
#
# Sets nothing up: it uses the .venv that travels with the repository (or the active Python). Settings
# run in order of interest within a total budget; those that no longer fit are listed as skipped, and
# a failing setting prints its error line while the others go on.
set -u
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi

TOTAL_BUDGET="${TOTAL_BUDGET:-250}"      # seconds for all settings together (leaves room for start-up)
SETTING_TIMEOUT="${SETTING_TIMEOUT:-90}"  # seconds one setting may take (a compile included)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi; then
    :
else
    echo "warning: nvidia-smi failed or is missing: no GPU visible, the numbers below are for the CPU"
fi
python -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}")' \
    || { echo "error: python with torch not found (activate the project's virtual environment)"; exit 1; }
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "warning: this torch cannot use a GPU (a CPU build, e.g. torch==x.y.z+cpu, or no driver): the table will be CPU numbers"
fi

out_args=()
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    out_args=(--out "$OUT/gpu_results.txt")
fi

python benchmarks/throughput.py --total-budget "$TOTAL_BUDGET" --setting-timeout "$SETTING_TIMEOUT" ${out_args[@]+"${out_args[@]}"} "$@"
status=$?
if [ -n "${OUT:-}" ]; then
    echo "table: $OUT/gpu_results.txt"
fi
exit $status
