#!/usr/bin/env bash
# Merge the last checkpoints of a DeepSpeed run with pmm_dist under the `deepspeed` launcher.
#
# Every rank merges its own byte-balanced share of the checkpoint files (model states, MoE expert
# files, pipeline layer files, ZeRO-3 fp32 partitions); ranks exchange only metadata. The launcher
# passes --local_rank=N and sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which pmm_dist reads.
# Any number of ranks works (the output does not depend on it); more ranks = more parallel I/O.
#
# Usage:   bash launch/deepspeed.sh RUN_DIR OUT_DIR [extra pmm_dist merge flags]
# Example: bash launch/deepspeed.sh /ckpt/run /ckpt/run_ema --method ema --alpha 0.2 --last 8 --interval 1000
#
# Multi-node: put the nodes in a hostfile ("node-1 slots=8" per line) and set HOSTFILE; the run
# and output directories must be on a file system every node sees.
set -euo pipefail

RUN_DIR=${1:?usage: launch/deepspeed.sh RUN_DIR OUT_DIR [pmm_dist merge flags]}
OUT_DIR=${2:?usage: launch/deepspeed.sh RUN_DIR OUT_DIR [pmm_dist merge flags]}
shift 2

NUM_GPUS=${NUM_GPUS:-8}            # processes per node (on a CPU-only node: any number, e.g. 2)
MASTER_PORT=${MASTER_PORT:-29511}  # pick another one if a training job on the node uses it
HOSTFILE_ARGS=()
[ -n "${HOSTFILE:-}" ] && HOSTFILE_ARGS=(--hostfile "$HOSTFILE")

# --module runs `python -m pmm_dist`; the launcher adds --local_rank=N itself.
# Default flags: SMA of every checkpoint up to the tag in RUN_DIR/latest, weights only
# (--optimizer drop), on the GPU of each rank when there is one (pmm_dist picks cuda:LOCAL_RANK).
deepspeed "${HOSTFILE_ARGS[@]}" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
    --module pmm_dist merge "$RUN_DIR" --out "$OUT_DIR" --format deepspeed "$@"

# The result is a DeepSpeed run directory: OUT_DIR/latest names the newest source's tag. Start
# training (or fine-tuning) from it with the same model, ds_config and parallel layout:
#   engine.load_checkpoint(OUT_DIR, load_module_only=True,
#                          load_optimizer_states=False, load_lr_scheduler_states=False)
# (ZeRO-3 needs load_optimizer_states=False: only then does DeepSpeed rebuild the weights from the
#  merged fp32 partitions.)
