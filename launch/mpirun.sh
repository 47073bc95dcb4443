#!/usr/bin/env bash
# Merge the last checkpoints of a DeepSpeed (or Megatron-LM) run with pmm_dist under MPI.
#
# MPI only starts the processes and tells each its rank (mpi4py; with the PyPI `mpich` wheel the
# `mpiexec` in the virtual environment matches mpi4py). Rank 0 then publishes a free port through
# MPI and the ranks form a torch process group (gloo by default; --backend nccl on GPUs) for the
# small metadata exchanges. No tensor data crosses ranks: each rank merges its own share of files.
#
# Usage:   bash launch/mpirun.sh RUN_DIR OUT_DIR [extra pmm_dist merge flags]
# Example: NP=16 bash launch/mpirun.sh /ckpt/run /ckpt/run_sma --last 10 --interval 2000
#
# Multi-node: MPIEXEC_ARGS="-f hostfile -ppn 8" (MPICH/Hydra) or "--hostfile hosts --npernode 8"
# (Open MPI, which also needs --allow-run-as-root --oversubscribe when run as root / oversubscribed).
# The run and output directories must be on a file system every node sees.
set -euo pipefail

RUN_DIR=${1:?usage: launch/mpirun.sh RUN_DIR OUT_DIR [pmm_dist merge flags]}
OUT_DIR=${2:?usage: launch/mpirun.sh RUN_DIR OUT_DIR [pmm_dist merge flags]}
shift 2

NP=${NP:-8}                      # total number of ranks (any number works; the output does not depend on it)
MPIEXEC=${MPIEXEC:-mpiexec}      # e.g. .venv/bin/mpiexec from the mpich wheel
PYTHON=${PYTHON:-python}
# Unset launcher variables a surrounding job may have left: pmm_dist would take them for its own rank.
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

# shellcheck disable=SC2086
"$MPIEXEC" -n "$NP" ${MPIEXEC_ARGS:-} \
    env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    "$PYTHON" -m pmm_dist merge "$RUN_DIR" --out "$OUT_DIR" "$@"

# For a DeepSpeed run the result is OUT_DIR/latest + OUT_DIR/<newest tag>/; load it with
#   engine.load_checkpoint(OUT_DIR, load_module_only=True,
#                          load_optimizer_states=False, load_lr_scheduler_states=False)
