#!/usr/bin/env bash
# The main job end to end on a fresh machine: set up .venv, generate a small synthetic Megatron-LM
# run (TP=2, PP=2, EP=2, 6 checkpoints), merge its last 4 checkpoints with EMA on 4 ranks under
# torchrun, and print the summary. Output: demo_out/ (a loadable Megatron checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
rm -rf demo_run
python -m pmm_dist.testing.synthetic demo_run --tp 2 --pp 2 --ep 2 --vp 2 --layers 8 --hidden 256 --ffn 512 \
    --experts 4 --vocab 1024 --fp32-masters --iterations 1000,2000,3000,4000,5000,6000
torchrun --standalone --nproc-per-node 4 -m pmm_dist merge demo_run --out demo_out --overwrite \
    --method ema --alpha 0.2 --last 4 --interval 1000 --device cpu
echo "merged checkpoint: demo_out/iter_0006000 (manifest: demo_out/pmm_manifest.json)"
