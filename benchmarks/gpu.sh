#!/usr/bin/env bash
# GPU check, 9 minutes at most (200 s of throughput settings, then 4 loader runs of 80 s at most): training throughput in fp32 / bf16 / fp16, channels_last off/on,
# torch.compile off/on, for the default CNN, a larger ResNet at 64x64, the tiny model and the default CNN
# at 64x64 (benchmarks/throughput.py); then, with CUDA, the input side (benchmarks/data.py --device cuda):
# the cached + augmented loader with the augmentation on the GPU against a bf16 training step, default
# CNN and the ResNet, at 64 and 224 px (issue 15: the loader should be >= 2x the step rate).
#
#   bash benchmarks/gpu.sh                 # from the repository root, with a CUDA build of torch in .venv
#   OUT=/some/dir bash benchmarks/gpu.sh   # also writes the table to $OUT/gpu_results.txt
#   bash benchmarks/gpu.sh --quick --precisions fp32   # extra arguments go to throughput.py (CPU works too)
#
# Sets nothing up: it uses the .venv that travels with the repository (or the active Python). Settings
# run in order of interest within a total budget; those that no longer fit are listed as skipped, and
# a failing setting prints its error line while the others go on.
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi

TOTAL_BUDGET="${TOTAL_BUDGET:-200}"      # seconds for all throughput settings together
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
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    RESNET=(--model model.name=resnet --model "model.channels=[64,128,256,512]" --model model.hidden=256)
    for size in 64 224; do
        for model in default resnet; do
            args=(--device cuda --bf16 --image-size "$size" --num-workers 8 --repeats 3)
            [ "$model" = resnet ] && args+=("${RESNET[@]}")
            if [ "$size" = 224 ]; then args+=(--images 800 --batch-size 64 --steps 5); else args+=(--images 2000); fi
            log=/dev/null
            [ -n "${OUT:-}" ] && log="$OUT/gpu_data.txt"
            echo "== benchmarks/data.py ${args[*]}" | tee -a "$log"
            # Prints at its end only: a run cut by the timeout leaves just this header and the timeout's line.
            timeout 80 python benchmarks/data.py "${args[@]}" 2>&1 | tee -a "$log" \
                || { rc=$?; status=1; echo "(exit status $rc: failed, or timed out after 80 s)" | tee -a "$log"; }
        done
    done
fi
exit $status
