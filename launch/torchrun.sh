#!/usr/bin/env bash
# Merge the last checkpoints of a Megatron-LM run on every GPU (or CPU core) of one node.
#
#   bash launch/torchrun.sh /ckpt/gpt-13b /ckpt/gpt-13b-ema [extra pmm-dist merge flags]
#
# Each of the NPROC ranks merges its own byte-balanced share of the shard files of all selected
# checkpoints; ranks exchange only metadata over gloo. Use one rank per GPU with --device cuda,
# or about one rank per 1-2 CPU cores with --device cpu: the job is I/O bound, so more ranks
# than storage streams help little.
set -euo pipefail
RUN_DIR=${1:?usage: torchrun.sh RUN_DIR OUT_DIR [flags]}
OUT_DIR=${2:?usage: torchrun.sh RUN_DIR OUT_DIR [flags]}
shift 2
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 4)")}

# --standalone: single node, picks a free rendezvous port (several merges may run side by side).
# OMP_NUM_THREADS: torchrun sets 1; raise it if NPROC is well below the core count on CPU.
exec torchrun --standalone --nproc-per-node "$NPROC" -m pmm_dist merge "$RUN_DIR" --out "$OUT_DIR" \
    --method ema --alpha 0.2 --last 8 --interval 1000 "$@"
