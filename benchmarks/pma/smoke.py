"""The PMA claim the engine must make true, in well under a minute (tests/test_pma_smoke.py).

    python -m benchmarks.pma.smoke --workdir DIR [--seed S]

Trains a tiny megatron-core GPTModel (2 layers, hidden 64) on the stdlib's .py files with warmup then
constant LR, saving a Megatron-LM legacy checkpoint every ``CKPT_EVERY`` steps; merges the last
``NUM_MERGED`` constant-LR checkpoints with ``python -m pmm_dist merge --method sma``; loads the result
into a fresh GPTModel with strict ``load_state_dict``; prints one JSON line with the held-out loss of
every merged checkpoint and of the SMA.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=64,
             micro_batch_size=8)
PEAK_LR = 3e-3
WARMUP_STEPS = 30
TOTAL_STEPS = 300
CKPT_EVERY = 20
NUM_MERGED = 4
EVAL_WINDOWS = 256


def run(workdir: str, seed: int) -> dict:
    warnings.filterwarnings("ignore")
    from benchmarks.pma import gpt
    t0 = time.time()
    gpt.setup_megatron(num_threads=1)
    cfg = gpt.ModelConfig(**MODEL)
    train, held = gpt.load_corpus(max_train_bytes=8 << 20)
    windows = gpt.held_out_windows(held, cfg, EVAL_WINDOWS)
    run_dir, out = os.path.join(workdir, "run"), os.path.join(workdir, "sma")
    for path in (run_dir, out):
        shutil.rmtree(path, ignore_errors=True)
    schedule = gpt.WSD(PEAK_LR, WARMUP_STEPS)
    model = gpt.build_model(cfg, seed)
    trainer = gpt.Trainer(model, train, cfg, seed)
    merged_its = list(range(TOTAL_STEPS - CKPT_EVERY * (NUM_MERGED - 1), TOTAL_STEPS + 1, CKPT_EVERY))
    losses = {}
    for step in range(1, TOTAL_STEPS + 1):
        trainer.step(step, schedule(step))
        if step % CKPT_EVERY == 0:
            gpt.save_checkpoint(run_dir, step, trainer, cfg, schedule)
            if step in merged_its:
                losses[step] = gpt.held_out_loss(model, windows)
    cmd = [sys.executable, "-m", "pmm_dist", "merge", run_dir, "--out", out, "--method", "sma",
           "--iterations", ",".join(map(str, merged_its)), "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"pmm_dist merge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    fresh = gpt.build_model(cfg, seed + 1)
    state = gpt.load_weights(fresh, gpt.checkpoint_path(out, merged_its[-1]))
    sma = gpt.held_out_loss(fresh, windows)
    return {"seed": seed, "iterations": merged_its, "held_out": [losses[it] for it in merged_its],
            "mean_held_out": sum(losses.values()) / len(losses), "sma_held_out": sma,
            "merged_iteration": state["iteration"], "merged_keys": sorted(state.keys()),
            "seconds": time.time() - t0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=1234)
    opts = parser.parse_args(argv)
    print(json.dumps(run(opts.workdir, opts.seed)))


if __name__ == "__main__":
    main()
