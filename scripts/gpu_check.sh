#!/bin/sh
# The parity suite and the bench on one GPU: `gptmod gpu-check` with the same interpreter (PYTHON, default python).
# Usage: scripts/gpu_check.sh [--out DIR] [--dry-run] [--only STEP] [--timeout-scale X]; see --help.
set -eu
exec "${PYTHON:-python}" -m gptmod.cli gpu-check "$@"
