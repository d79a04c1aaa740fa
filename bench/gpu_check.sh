#!/bin/sh
# bench/gpu_check.sh DIR [gpucheck flags]: every GPU check in one command (python -m hvae_fast.gpucheck).
out=$(realpath -m "${1:?usage: bench/gpu_check.sh DIR [--budget SECONDS] [--stages A,B] [--allow-cpu]}") && shift
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m hvae_fast.gpucheck --out "$out" "$@"
