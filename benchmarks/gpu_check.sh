#!/usr/bin/env bash
# One prepared command for a lent GPU window: every GPU check, each in its own time budget (about 8 min at
# most on one H100/H200); on a machine without a GPU the CPU halves (about 5 min). See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--parts xattn,mmca] [--out DIR] [--cpu]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh"
if [ "$#" -gt 0 ]; then
    GPU_CHECK_COMMAND+="$(printf ' %q' "$@")"
fi
export GPU_CHECK_COMMAND
exec python3 benchmarks/gpu_check.py "$@"
