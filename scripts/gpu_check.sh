#!/usr/bin/env bash
# The accelerator check, in one call: scripts/gpu_check.sh [--smoke] DATA_DIR
# (scripts/gpu_check.py says what it runs). Runs from the checkout, nothing installed:
# the checkout goes on PYTHONPATH; $PYTHON picks the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/scripts/gpu_check.py" "$@"
