#!/usr/bin/env bash
# Set up .venv exactly as the demo does, then run the whole test suite (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q tests "$@"
