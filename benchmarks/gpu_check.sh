#!/usr/bin/env bash
# gpu_check.sh: the first thing to run on a lent GPU. Every CUDA path of kiln, the GPU
# benchmarks and an NCCL check, each a subprocess with a timeout, within --budget-s (540 s);
# one report: runs/gpu_check/report.json and report.md (--out DIR).
#
#   bash benchmarks/gpu_check.sh                        # make setup (CUDA torch), then every step
#   bash benchmarks/gpu_check.sh --no-setup             # use .venv as it is (offline GPU box)
#   bash benchmarks/gpu_check.sh --dry-run --no-setup   # the same steps on the CPU, tiny sizes
#   bash benchmarks/gpu_check.sh --help                 # every option and step
#
# Exit code: 0 when no step failed, 1 when one did, 2 for bad arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The driver needs only the standard library, so it runs before setup made .venv.
python="${root}/.venv/bin/python"
[[ -x "${python}" ]] || python="$(command -v python3)"
exec "${python}" "${root}/benchmarks/gpu_check.py" "$@"
