"""pmm_dist ``--format hf`` against mergekit ``linear`` on the same Hugging Face checkpoints.

    python -m benchmarks.hf_vs_mergekit [--checkpoints 4] [--layers 3] [--repeats 3] [--work DIR]

Writes N Llama-shaped checkpoints (bf16 matrices, fp32 norms; ~200 MB each with the defaults),
warms the page cache, then times, best of ``--repeats``, wall clock of whole commands:
  whole commands: pmm_dist at world size 1 and 2 (torchrun), SMA; mergekit-yaml linear, dtype
  float32 (fp32 output: what the tests compare with), and with out_dtype bfloat16 (the same
  output bytes as pmm_dist);
  the merge alone: pmm_dist.merge and mergekit's run_merge inside one already-started Python.
and checks that the outputs agree (pmm_dist vs mergekit fp32: within mergekit's rounding).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.hf_models import llama_config, load_model_dir, save_checkpoint  # noqa: E402


def make_checkpoints(work: str, num: int, layers: int) -> list:
    config = llama_config(num_layers=layers, hidden=1024, ffn=2816, vocab=32000)
    config["num_attention_heads"], config["num_key_value_heads"] = 16, 8
    dirs = []
    for step in range(1, num + 1):
        ckpt = os.path.join(work, "run", f"step_{step * 1000}")
        dirs.append(ckpt)
        if os.path.isfile(os.path.join(ckpt, "config.json")):
            continue
        generator = torch.Generator().manual_seed(step)
        hidden, ffn, vocab, kv = 1024, 2816, 32000, 512
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                           p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                           p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                           p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                           p + "mlp.down_proj.weight": (hidden, ffn)})
        state = {n: torch.randn(s, generator=generator).to(torch.float32 if len(s) == 1 else torch.bfloat16)
                 for n, s in shapes.items()}
        save_checkpoint(ckpt, state, config)
    return dirs


def timed(cmd, env=None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(REPO, "benchmarks", "work", "hf"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    dirs = make_checkpoints(args.work, args.checkpoints, args.layers)
    size = sum(os.path.getsize(os.path.join(dirs[-1], f)) for f in os.listdir(dirs[-1]))
    for d in dirs:  # warm the page cache: every tool below reads from memory
        for f in os.listdir(d):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(64 << 20):
                    pass
    weights = [1.0 / len(dirs)] * len(dirs)
    out = tempfile.mkdtemp(prefix="hfbench_", dir=args.work)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    pmm = [sys.executable, "-m", "pmm_dist", "merge", *dirs, "--method", "sma", "--device", "cpu", "--quiet",
           "--overwrite", "--out"]
    configs = {}
    for name, extra in (("fp32", {}), ("bf16out", {"out_dtype": "bfloat16"})):
        config = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                  "models": [{"model": d, "parameters": {"weight": w}} for d, w in zip(dirs, weights)], **extra}
        configs[name] = os.path.join(out, f"mergekit_{name}.yml")
        with open(configs[name], "w") as f:
            json.dump(config, f)  # JSON is YAML
    mergekit_cli = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    cases = {
        "pmm_dist, 1 process": lambda: timed(pmm + [os.path.join(out, "pmm1")], env),
        "pmm_dist, torchrun 2 ranks": lambda: timed(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] + pmm[1:]
            + [os.path.join(out, "pmm2")], env),
        "mergekit-yaml linear, fp32 out": lambda: timed([mergekit_cli, configs["fp32"], os.path.join(out, "mk_fp32"),
                                                          "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                                                         {"HF_HUB_OFFLINE": "1"}),
        "mergekit-yaml linear, bf16 out": lambda: timed([mergekit_cli, configs["bf16out"], os.path.join(out, "mk_bf16"),
                                                          "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                                                         {"HF_HUB_OFFLINE": "1"}),
    }
    best = {}
    for _ in range(args.repeats):
        for name, run in cases.items():
            if name.startswith("mergekit"):  # it refuses nothing, but would mix old and new shards
                shutil.rmtree(os.path.join(out, "mk_fp32" if "fp32" in name else "mk_bf16"), ignore_errors=True)
            seconds = run()
            print(f"  {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
            best[name] = min(best.get(name, float("inf")), seconds)
    # The merge alone, without either tool's start-up (mergekit's import takes ~5 s): both in one
    # already-started Python, alternating, best of ``--repeats``.
    script = f"""
import json, shutil, sys, time
sys.path.insert(0, {REPO!r})
import pmm_dist
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
configs = {{name: json.load(open(path)) for name, path in {configs!r}.items()}}
options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
cases = {{
    "pmm_dist.merge in-process, 1 rank": lambda out: pmm_dist.merge(sources={dirs!r}, out=out, overwrite=True,
                                                                     device="cpu", quiet=True),
    "mergekit run_merge in-process, fp32 out": lambda out: run_merge(
        MergeConfiguration.model_validate(configs["fp32"]), out, options=options),
    "mergekit run_merge in-process, bf16 out": lambda out: run_merge(
        MergeConfiguration.model_validate(configs["bf16out"]), out, options=options),
}}
best = {{}}
for _ in range({args.repeats}):
    for name, run in cases.items():
        out = {os.path.join(out, "inproc")!r}
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        run(out)
        best[name] = min(best.get(name, 1e9), time.perf_counter() - started)
print(json.dumps(best))
"""
    in_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if in_process.returncode != 0:
        raise SystemExit(in_process.stderr[-3000:])
    best.update(json.loads(in_process.stdout.strip().splitlines()[-1]))
    # The outputs agree (the tests check this tightly; here a sanity check on the benchmark's own inputs).
    ours, theirs = load_model_dir(os.path.join(out, "pmm2")), load_model_dir(os.path.join(out, "mk_fp32"))
    worst = max(((ours[n].double() - theirs[n].double()).abs().max() /
                 theirs[n].double().abs().max().clamp_min(1e-30)).item() for n in theirs)
    load = os.getloadavg()
    print(f"{len(dirs)} checkpoints x {size / 1e6:.0f} MB ({len(ours)} tensors), {os.cpu_count()} CPU cores, "
          f"load average {load[0]:.1f} at the end")
    for name, seconds in best.items():
        print(f"  {name:48s} {seconds:7.2f} s")
    fastest_pmm = min(best["pmm_dist, 1 process"], best["pmm_dist, torchrun 2 ranks"])
    print(f"  whole command, mergekit-yaml / pmm_dist: "
          f"{best['mergekit-yaml linear, fp32 out'] / fastest_pmm:.2f}x (fp32 out), "
          f"{best['mergekit-yaml linear, bf16 out'] / fastest_pmm:.2f}x (bf16 out)")
    print(f"  merge alone, run_merge / pmm_dist.merge: "
          f"{best['mergekit run_merge in-process, fp32 out'] / best['pmm_dist.merge in-process, 1 rank']:.2f}x "
          f"(fp32 out), "
          f"{best['mergekit run_merge in-process, bf16 out'] / best['pmm_dist.merge in-process, 1 rank']:.2f}x "
          f"(bf16 out)")
    print(f"  largest relative difference pmm_dist vs mergekit fp32: {worst:.2e}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
