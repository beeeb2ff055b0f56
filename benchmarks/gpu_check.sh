#!/usr/bin/env bash
# The one-command GPU check (benchmarks/README.md): every GPU-only path, timed, in minutes.
#   bash benchmarks/gpu_check.sh              # CUDA: tests, training runs, resume, benchmarks
#   bash benchmarks/gpu_check.sh --device cpu --quick   # the smoke test CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
