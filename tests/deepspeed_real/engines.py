"""Real DeepSpeed engines on CPU (gloo), for tests/test_deepspeed_real.py.

Launch with torchrun (2 processes unless said otherwise):

  train OUT [--runs NAME[,NAME...]]
      For each run: build its model (seed 0), wrap it with ``deepspeed.initialize`` (its ZeRO stage
      and dtype, a torch Adam), train STEPS steps on random data (different on each rank) and call
      ``engine.save_checkpoint(OUT/NAME, client_state=...)`` every SAVE_EVERY steps: tags
      global_step2, 4, 6, 8, and DeepSpeed's own ``latest``. Several runs in one launch: start-up
      (imports, process group) is paid once. The "_dp1" run trains at data-parallel size 1 inside
      the 2-process launch: an ``mpu`` gives each rank a data-parallel group of its own (each rank
      trains alone; rank 0's checkpoints are kept), so its ZeRO partition count is 1, not 2.

  load SPEC.json
      SPEC: {"merges": [pmm_dist command-line arguments, ...],
             "loads": [{"run": NAME, "checkpoint": DIR, "dump": DIR,
                        "full": bool, "config": {section: {...}}, "step_with_lr0": bool}, ...]}
      First every merge, through the command line's entry point at this launch's world size, in
      this process group (pmm_dist uses an initialised default group). Then for each load: a FRESH
      engine of the run's model (another seed, so other weights) and config ("config" overrides
      entries), ``engine.load_checkpoint(DIR, load_module_only=True, load_optimizer_states=False,
      load_lr_scheduler_states=False)`` (with "full": the default ``load_checkpoint(DIR)``, a full
      resume; with "step_with_lr0": then one optimizer step at learning rate 0), and a dump of what
      this rank holds to DUMP/rank{r}.pt: every parameter (ZeRO-3: gathered; MoE experts under
      their GLOBAL ids; pipeline: this stage's layers) and buffer, and which parameters changed.
      A "_dp1" run's engine is built at data-parallel size 1, as it was trained.
      With "probe": a full load (``tag`` picks a checkpoint of a run directory), then the dump also
      holds what the optimizer continues from, through DeepSpeed's own accessors: each parameter's
      fp32 master (``safe_get_full_fp32_param``) and Adam moments (``safe_get_full_optimizer_state``),
      the scheduler's state and the engine's global step; then one training step (the run's own
      learning rate), whose loss and whether every weight changed and stayed finite are recorded.

The models: "dense" (Linear 8->15, LayerNorm, Linear 15->6, a float buffer updated in forward and an
integer buffer; 135-element weight, so ZeRO-3 partitions need padding), "moe" (Linear, a
``deepspeed.moe.layer.MoE`` of 4 experts with expert parallelism 2, Linear) and "pipe" (a
5-layer ``PipelineModule`` in 2 stages).
"""
import argparse
import json
import os
import shutil
import sys

import torch
import torch.nn as nn

STEPS = 8
SAVE_EVERY = 2
TAGS = [f"global_step{step}" for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
LOAD_SEED = 1234

# name -> (model, ZeRO stage, dtype)
RUNS = {f"zero{stage}_{dtype}": ("dense", stage, dtype) for stage in range(4) for dtype in ("fp32", "bf16")}
RUNS["moe_ep2"] = ("moe", 2, "bf16")
RUNS["pipe_2stage"] = ("pipe", 1, "fp32")
RUNS["zero2_fp32_dp1"] = ("dense", 2, "fp32")  # data-parallel size 1 (see SoloMPU)
RUNS["zero3_fp32_dp1"] = ("dense", 3, "fp32")  # the same, under ZeRO-3 (layout-change tests)
# Optimizer-aware merges (tests/test_deepspeed_optimizer_real.py): with a learning-rate scheduler.
OPTIM_RUNS = [f"opt_zero{stage}_{dtype}" for stage in (1, 2, 3) for dtype in ("fp32", "bf16")]
OPTIM_RUNS += ["opt_zero2_bf16_dp1", "opt_zero3_bf16_dp1"]
RUNS.update({run: ("dense", int(run[len("opt_zero")]), run.split("_")[2]) for run in OPTIM_RUNS})


def _deepspeed():
    import deepspeed
    import deepspeed.ops
    # The CPU accelerator would JIT-compile its shared-memory collectives (~30 s); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 15)
        self.norm = nn.LayerNorm(15)
        self.out = nn.Linear(15, 6)
        self.register_buffer("running_mean", torch.zeros(6))  # float buffer: merged like a weight
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))  # integer: the newest's

    def forward(self, x):
        y = self.out(nn.functional.gelu(self.norm(self.inp(x))))
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.5).add_(0.5 * y.detach().float().mean(0).to(self.running_mean.dtype))
                self.num_batches += 1
        return y


class MoENet(nn.Module):
    def __init__(self):
        super().__init__()
        from deepspeed.moe.layer import MoE
        self.inp = nn.Linear(8, 16)
        self.moe = MoE(hidden_size=16, expert=nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)),
                       num_experts=4, ep_size=2, k=1, min_capacity=4)
        self.out = nn.Linear(16, 6)

    def forward(self, x):
        hidden, _, _ = self.moe(self.inp(x))
        return self.out(hidden)


def _mse(output, target):
    return (output.float() - target.float()).pow(2).mean()


def build(run: str, seed: int):
    """(model, torch optimizer, ds_config) of ``run``, initialised from ``seed``."""
    kind, stage, dtype = RUNS[run]
    torch.manual_seed(seed)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
              "zero_optimization": {"stage": stage}}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if run.startswith("opt_"):
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-2,
                                                              "warmup_num_steps": 20}}
    if kind == "dense":
        model = DenseNet()
        params = model.parameters()
    elif kind == "moe":
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        model = MoENet()
        # ZeRO needs expert and non-expert parameters in separate groups (other data-parallel groups)
        params = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                       "name": "all"})
    else:
        from deepspeed.pipe import LayerSpec, PipelineModule
        layers = [LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.GELU), LayerSpec(nn.Linear, 16, 16),
                  LayerSpec(nn.LayerNorm, 16), LayerSpec(nn.Linear, 16, 6)]
        model = PipelineModule(layers=layers, num_stages=2, loss_fn=_mse, partition_method="uniform")
        config["gradient_accumulation_steps"] = 2  # two micro-batches through the pipeline per step
        params = model.parameters()
    return model, torch.optim.Adam(params, lr=2e-2), config


def _batches(rank: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(100 + rank)
    while True:
        yield (torch.randn(4, 8, generator=generator).to(dtype), torch.randn(4, 6, generator=generator).to(dtype))


class SoloMPU:
    """Model- and data-parallel groups of one rank each: every rank trains its own DP=1 engine."""

    def __init__(self):
        import torch.distributed as dist
        groups = [dist.new_group([rank]) for rank in range(dist.get_world_size())]  # collective: all ranks
        self.group = groups[dist.get_rank()]

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_group(self):
        return self.group

    get_data_parallel_rank = get_model_parallel_rank
    get_data_parallel_world_size = get_model_parallel_world_size
    get_data_parallel_group = get_model_parallel_group


def _order(items, key=lambda item: item):
    """Engines with their own parallel groups leave DeepSpeed's global group state set (a pipeline's
    grid, an mpu), which breaks a plain engine initialised after them in the same process: plain
    runs first, then the DP=1 run, the pipeline last."""
    return sorted(items, key=lambda item: (RUNS[key(item)][0] == "pipe", key(item).endswith("_dp1")))


def cmd_train(opts):
    deepspeed = _deepspeed()
    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    for run in _order(opts.runs.split(",")):
        model, optimizer, config = build(run, seed=0)
        solo = run.endswith("_dp1")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               mpu=SoloMPU() if solo else None)
        dtype = torch.bfloat16 if RUNS[run][2] == "bf16" else torch.float32
        batches = _batches(rank, dtype)
        save_dir = os.path.join(opts.out, run) if rank == 0 or not solo else os.path.join(opts.out, f".{run}.rank{rank}")
        for step in range(1, STEPS + 1):
            if RUNS[run][0] == "pipe":
                engine.train_batch(batches)
            else:
                x, y = next(batches)
                engine.backward(_mse(engine(x), y))
                engine.step()
            if step % SAVE_EVERY == 0:
                engine.save_checkpoint(save_dir, client_state={"step_seen": step, "note": f"{run} at {step}"})
        if save_dir != os.path.join(opts.out, run):
            shutil.rmtree(save_dir)  # another rank's solo run: not needed
        del engine, optimizer, model


def _named_parameters(engine, run):
    """Every parameter this rank holds, full (ZeRO-3 gathered), under its global name."""
    import deepspeed
    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=RUNS[run][1] == 3):
        named = {name: p.detach().clone() for name, p in module.named_parameters()}
    if RUNS[run][0] == "moe":
        from deepspeed.utils import groups
        moe = module.moe
        ep_rank = groups._get_expert_parallel_rank(moe.expert_group_name)
        prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
        renamed = {}
        for name, value in named.items():
            if name.startswith(prefix):
                local, rest = name[len(prefix):].split(".", 1)
                name = f"{prefix}{ep_rank * moe.num_local_experts + int(local)}.{rest}"
            renamed[name] = value
        named = renamed
    return named


def cmd_load(opts):
    deepspeed = _deepspeed()
    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    spec = json.load(open(opts.spec))
    if spec.get("merges"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from pmm_dist.cli import main as pmm_dist_main
        for args in spec["merges"]:
            assert pmm_dist_main(args) == 0, f"pmm_dist {' '.join(args)} failed"
    for load in _order(spec["loads"], key=lambda load: load["run"]):
        run = load["run"]
        model, optimizer, config = build(run, seed=LOAD_SEED)
        for section, values in load.get("config", {}).items():
            config.setdefault(section, {}).update(values)
        # a "_dp1" run's engine has data-parallel size 1, as it was trained (see SoloMPU)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               mpu=SoloMPU() if run.endswith("_dp1") else None)
        before = _named_parameters(engine, run)
        if load.get("probe"):
            path, client_state = engine.load_checkpoint(load["checkpoint"], tag=load.get("tag"))
        elif load.get("full"):
            path, client_state = engine.load_checkpoint(load["checkpoint"])
        else:
            path, client_state = engine.load_checkpoint(load["checkpoint"], load_module_only=True,
                                                        load_optimizer_states=False,
                                                        load_lr_scheduler_states=False)
        assert path is not None, f"load_checkpoint({load['checkpoint']}) loaded nothing"
        if load.get("step_with_lr0"):
            # One optimizer step that changes no master weight (lr 0) but copies the fp32 masters
            # into the bf16 parameters: shows which weights the optimizer continues from.
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0
            x, y = next(_batches(rank, next(engine.module.parameters()).dtype))
            engine.backward(_mse(engine(x), y))
            engine.step()
        after = _named_parameters(engine, run)
        dump = {"params": after, "buffers": {n: b.detach().clone() for n, b in engine.module.named_buffers()},
                "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
                "load_path": path, "client_state_keys": sorted(client_state or {})}
        if load.get("probe"):
            dump.update(_probe(engine, run, rank))
        os.makedirs(load["dump"], exist_ok=True)
        torch.save(dump, os.path.join(load["dump"], f"rank{rank}.pt"))
        del engine, optimizer, model


def _probe(engine, run, rank):
    """What the loaded optimizer holds (through DeepSpeed's accessors), then one training step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    # ZeRO-1/2 link each parameter to its optimizer state lazily, at the first step: link now
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    masters, moments = {}, {}
    for name, param in engine.module.named_parameters():  # collective under ZeRO-3: every rank, same order
        masters[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
        moments[name] = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                         for key in ("exp_avg", "exp_avg_sq")}
    probe = {"masters": masters, "moments": moments, "global_steps": engine.global_steps,
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "lr": [group["lr"] for group in engine.optimizer.param_groups]}
    before = _named_parameters(engine, run)
    x, y = next(_batches(rank, next(engine.module.parameters()).dtype))
    loss = _mse(engine(x), y)
    engine.backward(loss)
    engine.step()
    after = _named_parameters(engine, run)
    probe["step"] = {"loss": float(loss), "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
                     "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
                     "global_steps": engine.global_steps}
    return probe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("out")
    train.add_argument("--runs", default=",".join(run for run in RUNS if run not in OPTIM_RUNS))
    load = commands.add_parser("load")
    load.add_argument("spec")
    opts = parser.parse_args(argv)
    {"train": cmd_train, "load": cmd_load}[opts.command](opts)


if __name__ == "__main__":
    main()
