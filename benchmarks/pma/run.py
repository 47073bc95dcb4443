"""What merging buys: pre-train a small GPT with a WSD schedule, merge its checkpoints with pmm_dist,
reproduce the PMA findings (arXiv 2505.12082) at toy scale on CPU.

    python -m benchmarks.pma.run            # the full experiment (report in benchmarks/results/)
    python -m benchmarks.pma.run --quick    # a much smaller model and run, a few minutes

Phases (fixed seed everywhere; every merge goes through the pmm_dist CLI):
1. main run: a megatron-core GPTModel (TP=1, CPU, fp32) on the stdlib's .py files, byte-level, with
   warmup then constant LR; a Megatron-LM legacy checkpoint every ``ckpt_every`` steps; held-out loss
   of every checkpoint.
2. branches, in ``num_workers`` processes (start as soon as their inputs exist):
   - decay branches forked from several points of the constant phase (linear decay to 0);
   - PMA-init: continue from the merged weights vs from the latest checkpoint (fresh optimizer both),
     and from merges that carry optimizer state (``--optimizer latest`` and ``--optimizer merge``:
     AdamW loaded from the merge, no re-warmup);
   - loss spike: an LR spike, the spiked run left to recover, and resumes from the last pre-spike
     checkpoint vs the SMA of the last 3 pre-spike checkpoints (fresh optimizer, and with the
     optimizer state of ``--optimizer latest`` / ``merge``).
3. merges (``python -m pmm_dist merge ... --iterations ...``), two at a time: SMA, WMA, EMA(0.1, 0.2)
   over N in ``merge_ns`` and the intervals in ``merge_intervals`` at each point; held-out loss of
   each merged checkpoint, loaded with strict load_state_dict.
4. the SMA curve along the whole run, at every checkpoint, from ONE ``pmm_dist watch --backfill
   --once --keep 0`` (incremental updates), timed beside the same windows merged one
   ``pmm_dist merge`` at a time (after the training workers are done), and checked equal to them.
5. results JSON, markdown report and PNG plots in benchmarks/results/.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment; ``full()`` is what the committed report shows, ``quick()`` a fast check."""
    name: str
    seed: int
    model: dict                     # benchmarks.pma.gpt.ModelConfig fields
    peak_lr: float
    warmup_steps: int
    total_steps: int                # end of the constant phase of the main run
    ckpt_every: int                 # K: steps between checkpoints
    fork_points: tuple              # decay branches and merge ablations at these iterations
    decay_steps: int                # length of a decay branch
    merge_ns: tuple                 # N
    merge_intervals: tuple          # V, in steps (multiples of ckpt_every)
    curve_n: int                    # the SMA curve along the run (at every checkpoint): N and V
    curve_interval: int
    pma_init_point: int             # PMA-init: continue from here
    pma_init_steps: int
    pma_init_n: int                 # SMA of the last pma_init_n checkpoints (interval ckpt_every)
    rewarmup_steps: int             # fresh optimizer: LR ramps up again over this many steps
    spike_point: int                # last pre-spike checkpoint
    spike_steps: int                # LR multiplied by spike_factor for this many steps
    spike_factor: float
    spike_run_steps: int            # the spiked run continues this long (spike included)
    resume_steps: int               # each resume trains this long
    eval_windows: int               # held-out windows of seq_length + 1 bytes
    branch_eval_every: int
    num_workers: int = 2

    @staticmethod
    def full():
        return ExperimentConfig(
            name="pma", seed=1234,
            model=dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                       seq_length=64, micro_batch_size=16),
            peak_lr=3e-3, warmup_steps=100, total_steps=2000, ckpt_every=50,
            fork_points=(1000, 1500, 2000), decay_steps=300,
            merge_ns=(3, 6, 10), merge_intervals=(50, 100),
            curve_n=10, curve_interval=50,
            pma_init_point=1500, pma_init_steps=300, pma_init_n=10, rewarmup_steps=20,
            spike_point=1000, spike_steps=10, spike_factor=30.0, spike_run_steps=300, resume_steps=300,
            eval_windows=384, branch_eval_every=50)

    @staticmethod
    def quick():
        return ExperimentConfig(
            name="pma-quick", seed=1234,
            model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       seq_length=64, micro_batch_size=8),
            peak_lr=3e-3, warmup_steps=30, total_steps=400, ckpt_every=20,
            fork_points=(240, 400), decay_steps=60,
            merge_ns=(3, 6), merge_intervals=(20, 40),
            curve_n=6, curve_interval=20,
            pma_init_point=300, pma_init_steps=60, pma_init_n=6, rewarmup_steps=10,
            spike_point=240, spike_steps=5, spike_factor=30.0, spike_run_steps=60, resume_steps=60,
            eval_windows=128, branch_eval_every=20)

    def methods(self):
        return [("sma", None), ("wma", None), ("ema", 0.1), ("ema", 0.2)]

    def checkpoints(self):
        return list(range(self.ckpt_every, self.total_steps + 1, self.ckpt_every))


# ----------------------------------------------------------------------------- worker side

_W = {}


def _worker_init(cfg_dict):
    # an initializer that raises makes multiprocessing.Pool respawn the worker forever: keep the error
    # and raise it from the first job instead
    try:
        _setup_worker(cfg_dict)
    except BaseException as exc:  # noqa: BLE001
        _W["error"] = exc


def _setup_worker(cfg_dict):
    warnings.filterwarnings("ignore")
    from benchmarks.pma import gpt
    gpt.setup_megatron(num_threads=1)
    cfg = ExperimentConfig(**cfg_dict)
    model_cfg = gpt.ModelConfig(**cfg.model)
    train, held = gpt.load_corpus()
    _W.update(cfg=cfg, model_cfg=model_cfg, train=train, windows=gpt.held_out_windows(held, model_cfg, cfg.eval_windows))


def train_branch(job: dict) -> dict:
    """Train from a checkpoint file for job['steps'] steps with an LR function; log losses.

    job: label, init (checkpoint path), start (iteration of the init), steps, fresh_optimizer,
    lr (list: one LR per step, step start+1 ... start+steps).
    """
    from benchmarks.pma import gpt
    if "error" in _W:
        raise RuntimeError(f"worker set-up failed: {_W['error']!r}")
    cfg, model_cfg = _W["cfg"], _W["model_cfg"]
    t0 = time.time()
    model = gpt.build_model(model_cfg, cfg.seed)
    state = gpt.load_weights(model, job["init"])
    trainer = gpt.Trainer(model, _W["train"], model_cfg, cfg.seed)
    if not job["fresh_optimizer"]:
        trainer.optimizer.load_state_dict(state["optimizer"])
    log = {"label": job["label"], "start": job["start"], "step": [], "train_loss": [], "grad_norm": [], "lr": [],
           "eval_step": [job["start"]], "held_out": [gpt.held_out_loss(model, _W["windows"])]}
    for k in range(job["steps"]):
        step = job["start"] + k + 1
        lr = job["lr"][k]
        loss, grad_norm = trainer.step(step, lr)
        log["step"].append(step)
        log["train_loss"].append(loss)
        log["grad_norm"].append(grad_norm)
        log["lr"].append(lr)
        if (k + 1) % cfg.branch_eval_every == 0 or k + 1 == job["steps"]:
            log["eval_step"].append(step)
            log["held_out"].append(gpt.held_out_loss(model, _W["windows"]))
    log["seconds"] = time.time() - t0
    return log


# ----------------------------------------------------------------------------- orchestration

class Experiment:
    def __init__(self, cfg: ExperimentConfig, workdir: str, results_dir: str):
        self.cfg = cfg
        self.workdir = workdir
        self.results_dir = results_dir
        self.run_dir = os.path.join(workdir, "run")
        self.merge_dir = os.path.join(workdir, "merged")
        self.merges = {}     # key -> dict(method, alpha, iterations, held_out, cli_seconds, path)
        self.timings = {}

    # --- phase 1
    def main_run(self, gpt, model_cfg, train, windows):
        cfg = self.cfg
        schedule = gpt.WSD(cfg.peak_lr, cfg.warmup_steps)
        model = gpt.build_model(model_cfg, cfg.seed)
        trainer = gpt.Trainer(model, train, model_cfg, cfg.seed)
        log = {"step": [], "train_loss": [], "grad_norm": [], "lr": [], "ckpt": [], "held_out": []}
        t0 = time.time()
        for step in range(1, cfg.total_steps + 1):
            lr = schedule(step)
            loss, grad_norm = trainer.step(step, lr)
            log["step"].append(step)
            log["train_loss"].append(loss)
            log["grad_norm"].append(grad_norm)
            log["lr"].append(lr)
            if step % cfg.ckpt_every == 0:
                gpt.save_checkpoint(self.run_dir, step, trainer, model_cfg, schedule)
                log["ckpt"].append(step)
                log["held_out"].append(gpt.held_out_loss(model, windows))
                print(f"  step {step:5d}  train {loss:.4f}  held-out {log['held_out'][-1]:.4f}  "
                      f"({time.time() - t0:.0f} s)", flush=True)
        log["seconds"] = time.time() - t0
        return log

    # --- merges through the CLI
    def merge_key(self, method, alpha, iterations, optimizer="drop"):
        tag = method if alpha is None else f"{method}{alpha}"
        return f"{tag}:{','.join(map(str, iterations))}" + ("" if optimizer == "drop" else f"+optimizer-{optimizer}")

    def window(self, point, n, interval):
        its = [point - interval * (n - 1 - i) for i in range(n)]
        return its if its[0] >= self.cfg.ckpt_every else None

    def _cli_merge(self, key, method, alpha, iterations, optimizer="drop", out=None):
        out = out or os.path.join(self.merge_dir, key.replace(":", "_").replace(",", "-").replace("+", "_"))
        if os.path.exists(out):
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "pmm_dist", "merge", self.run_dir, "--out", out, "--method", method,
               "--iterations", ",".join(map(str, iterations)), "--optimizer", optimizer, "--quiet", "--device", "cpu"]
        if alpha is not None:
            cmd += ["--alpha", str(alpha)]
        t0 = time.time()
        _pmm_dist(cmd)
        from benchmarks.pma.gpt import checkpoint_path
        with open(os.path.join(out, "pmm_manifest.json")) as f:
            bytes_read = json.load(f)["bytes_read"]
        return dict(method=method, alpha=alpha, iterations=list(iterations), optimizer=optimizer,
                    path=checkpoint_path(out, iterations[-1]), cli_seconds=time.time() - t0,
                    bytes_read=bytes_read, command=" ".join(cmd[1:]))

    def run_merges(self, specs, evaluate):
        """specs: [(method, alpha, iterations[, optimizer])]; merges two at a time, evaluates each as it lands."""
        specs = [tuple(spec) + ("drop",) * (4 - len(spec)) for spec in specs]
        todo = {}
        for method, alpha, its, optimizer in specs:
            key = self.merge_key(method, alpha, its, optimizer)
            if key not in self.merges:
                todo[key] = (key, method, alpha, its, optimizer)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {pool.submit(self._cli_merge, *t): key for key, t in todo.items()}
            for fut in concurrent.futures.as_completed(futures):
                rec = fut.result()
                rec["held_out"] = evaluate(rec["path"])
                self.merges[futures[fut]] = rec
        return [self.merges[self.merge_key(*spec)] for spec in specs]

    # --- phase 4: the merged curve from one watcher, beside one merge per point
    def merged_curve(self, evaluate):
        """Every checkpoint's SMA of the last ``curve_n`` (fewer at the start), published by ONE
        ``watch --backfill --once``; then the same windows merged by ``merge``, one process each,
        one after another, timed the same way and compared tensor by tensor with the watcher's."""
        import torch
        from benchmarks.pma.gpt import checkpoint_path
        cfg = self.cfg
        out = os.path.join(self.workdir, "watched")
        cmd = [sys.executable, "-m", "pmm_dist", "watch", self.run_dir, "--out", out, "--method", "sma",
               "--last", str(cfg.curve_n), "--interval", str(cfg.curve_interval), "--backfill", "--once",
               "--keep", "0", "--quiet", "--device", "cpu"]
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        _pmm_dist(cmd)
        watch_s = time.time() - t0
        with open(os.path.join(out, ".pmm_watch", "history.json")) as f:
            published = json.load(f)["published"]
        def model(path):
            return torch.load(path, map_location="cpu", weights_only=False)["model"]

        sources = {}
        points, merge_s, merge_bytes = [], 0.0, 0
        baseline = os.path.join(self.workdir, "one-merge-per-point")
        for entry in published:
            first, last = entry["window"]["first"], entry["window"]["last"]
            its = list(range(first, last + 1, cfg.curve_interval))
            rec = self._cli_merge(None, "sma", None, its, out=baseline)
            merge_s += rec["cli_seconds"]
            merge_bytes += rec["bytes_read"]
            watched = checkpoint_path(out, entry["iteration"])
            for it in its:
                sources.setdefault(it, model(checkpoint_path(self.run_dir, it)))
            errors = rounding_errors({"watch": model(watched), "merge": model(rec["path"])},
                                     [sources[it] for it in its])
            points.append(dict(iteration=entry["iteration"], iterations=its, incremental=entry["incremental"],
                               bytes_read=entry["bytes_read"], held_out=evaluate(watched), **errors))
        shutil.rmtree(baseline, ignore_errors=True)
        shown = ["RUN" if c == self.run_dir else "OUT" if c == out else c for c in cmd[3:]]
        return dict(command=" ".join(shown), watch_seconds=watch_s, published=len(points),
                    watch_bytes_read=sum(p["bytes_read"] for p in points), merge_seconds=merge_s,
                    merge_bytes_read=merge_bytes, points=points)

    def run(self):
        cfg = self.cfg
        warnings.filterwarnings("ignore")
        from benchmarks.pma import gpt
        t_all = time.time()
        if os.path.exists(self.workdir):
            shutil.rmtree(self.workdir)
        os.makedirs(self.merge_dir)
        gpt.setup_megatron(num_threads=1)
        model_cfg = gpt.ModelConfig(**cfg.model)
        train, held = gpt.load_corpus()
        windows = gpt.held_out_windows(held, model_cfg, cfg.eval_windows)
        eval_model = gpt.build_model(model_cfg, cfg.seed + 1)

        def evaluate(path):
            gpt.load_weights(eval_model, path)
            return gpt.held_out_loss(eval_model, windows)

        print(f"[1/5] main run: {cfg.total_steps} steps, checkpoint every {cfg.ckpt_every}", flush=True)
        main = self.main_run(gpt, model_cfg, train, windows)
        self.timings["main_run_s"] = main["seconds"]

        print("[2/5] branches (decay, PMA-init, loss spike) in worker processes", flush=True)
        t0 = time.time()
        pre_spike = self.window(cfg.spike_point, 3, cfg.ckpt_every)
        init_its = self.window(cfg.pma_init_point, cfg.pma_init_n, cfg.ckpt_every)
        starts = self.run_merges([("sma", None, its, optimizer) for its in (pre_spike, init_its)
                                  for optimizer in OPTIMIZER_POLICIES], evaluate)
        jobs = self.branch_jobs(gpt, {(tuple(r["iterations"]), r["optimizer"]): r["path"] for r in starts},
                                pre_spike, init_its)
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(cfg.num_workers, initializer=_worker_init, initargs=(dataclasses.asdict(cfg),))
        pending = pool.map_async(train_branch, jobs, chunksize=1)

        print("[3/5] merges through the pmm_dist CLI", flush=True)
        t1 = time.time()
        specs = []
        for point in cfg.fork_points:
            for n in cfg.merge_ns:
                for interval in cfg.merge_intervals:
                    its = self.window(point, n, interval)
                    if its:
                        specs += [(m, a, its) for m, a in cfg.methods()]
        self.run_merges(specs, evaluate)
        self.timings["merges_s"] = time.time() - t1
        branches = pending.get()
        pool.close()
        pool.join()
        self.timings["branches_and_merges_s"] = time.time() - t0
        self.timings["merge_cli_calls"] = len(self.merges)
        self.timings["merge_cli_mean_s"] = sum(r["cli_seconds"] for r in self.merges.values()) / len(self.merges)

        print("[4/5] the merged curve: one watch --backfill beside one merge per point", flush=True)
        t0 = time.time()
        curve = self.merged_curve(evaluate)
        self.timings["curve_s"] = time.time() - t0

        print("[5/5] report", flush=True)
        self.timings["total_s"] = time.time() - t_all
        results = {
            "config": dataclasses.asdict(cfg),
            "command": "python -m benchmarks.pma.run" + (" --quick" if cfg.name.endswith("quick") else ""),
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "tokens_per_step": model_cfg.tokens_per_step(),
            "num_params": sum(p.numel() for p in eval_model.parameters()),
            "corpus": {"train_bytes": len(train), "held_out_bytes": len(held),
                       "held_out_tokens_evaluated": cfg.eval_windows * model_cfg.seq_length},
            "main": main,
            "branches": {b["label"]: b for b in branches},
            "merges": self.merges,
            "pma_init_merge": self.merge_key("sma", None, init_its),
            "spike_merge": self.merge_key("sma", None, pre_spike),
            "curve": curve,
            "timings": self.timings,
        }
        return results

    def branch_jobs(self, gpt, merged, pre_spike, init_its):
        """merged: {(iterations, optimizer policy): merged checkpoint}. Starts from a merge with
        optimizer state load it and keep the constant LR (no re-warmup: the moments are there);
        starts without take a fresh AdamW and a short re-warmup."""
        cfg = self.cfg
        constant = [cfg.peak_lr] * max(cfg.pma_init_steps, cfg.resume_steps)
        jobs = []
        for point in cfg.fork_points:
            schedule = gpt.WSD(cfg.peak_lr, cfg.warmup_steps, decay_start=point, decay_steps=cfg.decay_steps)
            jobs.append(dict(label=f"decay@{point}", init=gpt.checkpoint_path(self.run_dir, point), start=point,
                             steps=cfg.decay_steps, fresh_optimizer=False,
                             lr=[schedule(point + k + 1) for k in range(cfg.decay_steps)]))

        def rewarm(steps):
            return [cfg.peak_lr * min(1.0, (k + 1) / cfg.rewarmup_steps) for k in range(steps)]

        p = cfg.pma_init_point
        jobs.append(dict(label="pma_init/latest", init=gpt.checkpoint_path(self.run_dir, p), start=p,
                         steps=cfg.pma_init_steps, fresh_optimizer=True, lr=rewarm(cfg.pma_init_steps)))
        jobs.append(dict(label="pma_init/merged", init=merged[(tuple(init_its), "drop")], start=p,
                         steps=cfg.pma_init_steps, fresh_optimizer=True, lr=rewarm(cfg.pma_init_steps)))
        for optimizer in OPTIMIZER_POLICIES[1:]:
            jobs.append(dict(label=f"pma_init/merged_optimizer_{optimizer}", init=merged[(tuple(init_its), optimizer)],
                             start=p, steps=cfg.pma_init_steps, fresh_optimizer=False,
                             lr=constant[:cfg.pma_init_steps]))
        s = cfg.spike_point
        spike_lr = [cfg.peak_lr * (cfg.spike_factor if k < cfg.spike_steps else 1.0) for k in range(cfg.spike_run_steps)]
        jobs.append(dict(label="spike/spiked", init=gpt.checkpoint_path(self.run_dir, s), start=s,
                         steps=cfg.spike_run_steps, fresh_optimizer=False, lr=spike_lr))
        jobs.append(dict(label="spike/resume_latest", init=gpt.checkpoint_path(self.run_dir, s), start=s,
                         steps=cfg.resume_steps, fresh_optimizer=True, lr=rewarm(cfg.resume_steps)))
        jobs.append(dict(label="spike/resume_sma3", init=merged[(tuple(pre_spike), "drop")], start=s,
                         steps=cfg.resume_steps, fresh_optimizer=True, lr=rewarm(cfg.resume_steps)))
        for optimizer in OPTIMIZER_POLICIES[1:]:
            jobs.append(dict(label=f"spike/resume_sma3_optimizer_{optimizer}", init=merged[(tuple(pre_spike), optimizer)],
                             start=s, steps=cfg.resume_steps, fresh_optimizer=False, lr=constant[:cfg.resume_steps]))
        jobs.sort(key=lambda j: -j["steps"])
        return jobs


OPTIMIZER_POLICIES = ("drop", "latest", "merge")   # pmm_dist merge --optimizer, drop first


def rounding_errors(merged: dict, sources: list) -> dict:
    """For each merged model (name -> state dict) of the SMA of ``sources``: its largest error in
    ulps of its stored dtype against the float64 reference, and the share of its elements that
    differ from the reference rounded to nearest (0 = correctly rounded); and the share of
    elements where the merged models differ from each other."""
    import torch
    worst = {name: 0.0 for name in merged}
    off = {name: 0 for name in merged}
    apart = total = 0
    for key, first in sources[0].items():
        if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
            continue
        exact = sum(s[key].double() for s in sources) / len(sources)
        nearest = exact.to(first.dtype)
        ulp = (torch.nextafter(nearest.abs(), torch.tensor(float("inf"), dtype=first.dtype)) - nearest.abs()).double()
        values = [m[key] for m in merged.values()]
        for name, value in zip(merged, values):
            worst[name] = max(worst[name], ((value.double() - exact).abs() / ulp).max().item())
            off[name] += (value != nearest).sum().item()
        apart += (values[0] != values[-1]).sum().item()
        total += first.numel()
    out = {f"{name}_max_ulps": worst[name] for name in merged}
    out.update({f"{name}_not_nearest": off[name] / total for name in merged})
    out["elements_apart"] = apart / total
    return out


def _pmm_dist(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pmm_dist failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_end": os.getloadavg()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a much smaller model and run (a few minutes)")
    parser.add_argument("--workdir", default=os.path.join(REPO, "benchmarks", "work", "pma"),
                        help="checkpoints and merges (deleted and re-created)")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--keep-workdir", action="store_true", help="keep the checkpoints and merges")
    opts = parser.parse_args(argv)
    cfg = ExperimentConfig.quick() if opts.quick else ExperimentConfig.full()
    workdir = opts.workdir + ("-quick" if opts.quick else "")
    t0 = time.time()
    results = Experiment(cfg, workdir, opts.results).run()
    with open(workdir + "-results.json", "w") as f:  # the raw results, also if the report fails
        json.dump(results, f)
    from benchmarks.pma import report
    paths = report.write(results, opts.results)
    if not opts.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.time() - t0:.0f} s: " + ", ".join(paths))


if __name__ == "__main__":
    main()
