#!/usr/bin/env bash
# Set up .venv exactly as the demo does, then run the whole test suite (CPU, about 12 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two pytest workers (pytest-xdist), each taking a whole module at a time, so that module-scoped
# fixtures (the real-framework runs) are built once. Most tests wait on a subprocess that uses one
# core: on 2 cores the suite took 12 min 12 s this way and 19 min 13 s in one process (1123 tests,
# same machine). PMM_TEST_WORKERS=0 runs it in one process; options given here come after, and win.
exec python -m pytest -q -n "${PMM_TEST_WORKERS:-2}" --dist loadfile tests "$@"
