#!/usr/bin/env bash
# GPU readiness in one command, on a machine with one GPU and this repository:
#
#   bench/gpu_check.sh [WHEELS_DIR]     install the wheels carried there (no registry needed:
#                                       deepspeed, megatron-core, webdataset, hydra-core, omegaconf,
#                                       antlr4-python3-runtime, submitit, wandb; FIELD-NOTES says
#                                       how to make them), then run bench.gpu_check
#   bench/gpu_check.sh --dry            the same path on the CPU with tiny models (the tests run it)
#
# Prints tokens/s, MFU and peak memory against pretrain-plan's prediction for gpt2-124m and
# gpt-1.3b, then asynchronous against synchronous checkpoint saves of a 350M model; everything,
# installation included, within 9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=()
wheels=""
for arg in "$@"; do
    case "$arg" in
        --dry) dry=(--dry) ;;
        *) wheels="$arg" ;;
    esac
done
if [[ -n "$wheels" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$wheels" deepspeed megatron-core webdataset \
        hydra-core omegaconf submitit wandb
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
if [[ ${#dry[@]} -gt 0 ]]; then
    export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} WANDB_MODE=${WANDB_MODE:-offline}
exec timeout 520 "$PY" -m bench.gpu_check --budget-s 360 "${dry[@]}"
