"""Scale, simulated without processes: planning at thousands of ranks and 100k shard files.

    python -m benchmarks.scale                          # 4096 ranks x 100k files (synthetic plan)
    python -m benchmarks.scale --real-files 100000      # also the real Megatron legacy planning
    python -m benchmarks.scale --ranks 4096 --files 100000 --checkpoints 8 --real-files 20000
    python -m benchmarks.scale --no-synthetic --dcp-chunks 1000000 --checkpoints 2 --profile

Reports, for the coordinator:
- synthetic plan: ``assign_units`` (the one LPT balancer) and the plan step's payloads, built by
  the engine's own ``MergePlan.rank_payloads`` and pickled as ``scatter_object_list`` pickles them:
  bytes each rank receives (min / median / max; torch pads every rank's bytes to the largest),
  what the coordinator sends in all, and the whole plan's size (what every rank would receive if
  the coordinator's own payload travelled with the others);
- the merge step's results (one UnitResult per file) as ``gather_step`` moves them: each rank sends
  its own to the coordinator only; every rank all-gathers one failure flag;
- with --real-files: ``plan_merge`` of a real Megatron legacy run directory (tiny shard files,
  hard links; pmm_dist.testing.scale) at that many shard files, wall time and how often each
  checkpoint's metadata (its first shard's saved args) was read;
- with --dcp-chunks: ``plan_merge --format dcp`` of --checkpoints FSDP2 checkpoints whose
  ``.metadata`` each describes that many chunks (pmm_dist.testing.synthetic_dcp.make_fsdp_run:
  4096 saving ranks, sparse data files), its phases, how often each ``.metadata`` was parsed, and
  the bytes each rank receives in the plan step.
Timings here are one run on a shared machine: repeat for a figure you rely on.
"""
import argparse
import cProfile
import json
import os
import pickle
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter

from pmm_dist.testing.scale import make_sharded_run, synthetic_plan, synthetic_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pickled(obj) -> int:
    return len(pickle.dumps(obj))  # scatter/gather_object_list pickle each object like this


def synthetic(num_files: int, world_size: int, num_checkpoints: int) -> dict:
    import pmm_dist.engine.planning  # noqa: F401 - imported before the clock starts
    started = time.perf_counter()
    plan, assign_seconds = synthetic_plan(num_files, world_size, num_checkpoints)
    plan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    payloads = plan.rank_payloads()
    sizes = [_pickled(p) for p in payloads[1:]]
    payload_seconds = time.perf_counter() - started
    results = [_pickled(synthetic_results(share)) for share in plan.shares]
    shares = [len(s) for s in plan.shares]
    return {
        "files": num_files, "ranks": world_size, "checkpoints": num_checkpoints,
        "assign_seconds": assign_seconds, "plan_seconds": plan_seconds,
        "payload_seconds": payload_seconds,
        "units_per_rank": {"min": min(shares), "max": max(shares)},
        "bytes_per_rank": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "bytes_received_per_rank_padded": max(sizes),
        "coordinator_sends_bytes": max(sizes) * (world_size - 1),
        "whole_plan_bytes": _pickled(payloads[0]),
        "light_plan_bytes": _pickled(payloads[1][0]) if world_size > 1 else None,
        "results_bytes_per_rank": {"median": statistics.median(results), "max": max(results)},
        "coordinator_receives_result_bytes": max(results) * world_size,
        "failure_flag_bytes_per_rank": _pickled(None) * world_size,
    }


def _instrumented_plan(options, world_size: int, phase_functions: dict, counted: tuple, profile: bool):
    """``plan_merge(options, world_size)`` timed, with seconds spent in each of ``phase_functions``
    ((owner, name) -> label), how often ``counted`` (owner, name: a metadata reader whose first
    argument is the path) parsed each file, and optionally a cProfile of the whole."""
    from pmm_dist.engine.planning import plan_merge
    phases, reads = Counter(), Counter()

    def timed(fn, label):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] += time.perf_counter() - started
        return run

    def counting(fn):
        def run(path, *args, **kwargs):
            reads[path] += 1
            return fn(path, *args, **kwargs)
        return run

    saved = {key: getattr(*key) for key in [*phase_functions, counted]}
    for (owner, name), label in phase_functions.items():
        setattr(owner, name, timed(saved[(owner, name)], label))
    setattr(*counted, counting(getattr(*counted)))  # around its timing, if it is timed too
    try:
        profiler = cProfile.Profile() if profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        plan, snapshot, _ = plan_merge(options, world_size)
        seconds = time.perf_counter() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
    return plan, snapshot, seconds, dict(phases), reads


def real_files(num_files: int, world_size: int, num_checkpoints: int, work: str, profile: bool = False) -> dict:
    """``plan_merge`` of a real run directory of tiny shard files, as the coordinator runs it."""
    from pmm_dist.engine.options import MergeOptions
    import pmm_dist.engine.planning as planning
    import pmm_dist.io.safe_load as loader
    from pmm_dist.formats.megatron import MegatronLegacyFormat

    run_dir = os.path.join(work, f"sharded_{num_checkpoints}x{num_files}")
    started = time.perf_counter()
    tp, pp, ep = make_sharded_run(run_dir, num_checkpoints, num_files)
    make_seconds = time.perf_counter() - started
    # Seconds in the parts of plan_merge that scale with the number of files; pickles actually
    # parsed (safe_load's own loader), per file.
    wrapped = {(planning, "snapshot_inputs"): "snapshot of every input file", (planning, "assign_units"): "assign_units",
               (planning, "fingerprint"): "fingerprint", (MegatronLegacyFormat, "plan_units"): "format's plan_units"}
    options = MergeOptions(sources=[run_dir], out=os.path.join(work, "out_scale"), method="ema", device="cpu",
                           format="megatron", quiet=True, dry_run=True)
    # Twice: the generated tree is kept between benchmark runs, and a previous run's cold part
    # (drop_caches) evicts its directory entries and inodes too, so the first pass measures the
    # disk's metadata reads (minutes here) and the second what the planner itself costs.
    first_pass_seconds = _instrumented_plan(options, world_size, wrapped, (loader, "_load"), False)[2]
    plan, snapshot, seconds, phases, reads = _instrumented_plan(options, world_size, wrapped, (loader, "_load"),
                                                                profile)
    return {"phases_seconds": phases, "first_pass_seconds": first_pass_seconds, "files_per_checkpoint": tp * pp * ep, "layout": [tp, pp, ep], "checkpoints": num_checkpoints,
            "ranks": world_size, "plan_merge_seconds": seconds, "make_seconds": make_seconds,
            "units": plan.num_units, "files_snapshotted": len(snapshot),
            "metadata_reads_per_checkpoint": max(reads.values()) if reads else 0,
            "metadata_files_read": len(reads)}


def dcp_chunks(num_chunks: int, world_size: int, num_checkpoints: int, work: str, saved_world_size: int = 4096,
               profile: bool = False) -> dict:
    """``plan_merge --format dcp`` of ``num_checkpoints`` FSDP2 checkpoints whose ``.metadata``
    each describes ``num_chunks`` chunks (saved by ``saved_world_size`` ranks; sparse data files:
    planning reads the metadata only), and the plan step's payloads at ``world_size`` ranks."""
    from pmm_dist.engine.options import MergeOptions
    import pmm_dist.engine.planning as planning
    import pmm_dist.formats.dcp as dcp
    from pmm_dist.testing.synthetic_dcp import make_fsdp_run

    run_dir = os.path.join(work, f"dcp_{num_checkpoints}x{num_chunks}")
    started = time.perf_counter()
    metadata = make_fsdp_run(run_dir, num_checkpoints, num_chunks, saved_world_size)
    make_seconds = time.perf_counter() - started
    wrapped = {(dcp, "load_metadata"): "unpickling .metadata", (planning, "snapshot_inputs"): "snapshot of every input file",
               (dcp.DcpFormat, "plan_units"): "format's plan_units (its metadata reads included)",
               (planning, "assign_units"): "assign_units", (planning, "fingerprint"): "fingerprint"}
    options = MergeOptions(sources=[run_dir], out=os.path.join(work, "out_scale"), method="ema", device="cpu",
                           format="dcp", quiet=True, dry_run=True)
    plan, snapshot, seconds, phases, reads = _instrumented_plan(options, world_size, wrapped,
                                                                (dcp, "load_metadata"), profile)
    started = time.perf_counter()
    sizes = [_pickled(p) for p in plan.rank_payloads()[1:]]
    payload_seconds = time.perf_counter() - started
    return {"chunks_per_checkpoint": sum(len(e.chunks) for e in metadata.state_dict_metadata.values()),
            "tensors": len(metadata.state_dict_metadata), "saved_world_size": saved_world_size,
            "metadata_bytes": os.path.getsize(os.path.join(run_dir, "step-1", dcp.DCP_METADATA)),
            "checkpoints": num_checkpoints, "ranks": world_size, "plan_merge_seconds": seconds,
            "phases_seconds": phases, "make_seconds": make_seconds, "units": plan.num_units,
            "files_snapshotted": len(snapshot), "metadata_parses": dict(Counter(reads.values())),
            "metadata_files_read": len(reads), "payload_seconds": payload_seconds,
            "bytes_per_rank": {"min": min(sizes, default=0), "median": statistics.median(sizes) if sizes else 0,
                               "max": max(sizes, default=0)}}


def measure(num_files=100_000, world_size=4096, num_checkpoints=8, real=0, work=None, profile=False,
            verbose=True, dcp=0, with_synthetic=True) -> dict:
    result = {"synthetic": synthetic(num_files, world_size, num_checkpoints)} if with_synthetic else {}
    if verbose and with_synthetic:
        s = result["synthetic"]
        b = s["bytes_per_rank"]
        print(f"scale: {world_size} ranks x {num_files} files, {num_checkpoints} checkpoints (synthetic plan)\n"
              f"  assign_units {s['assign_seconds']:.2f} s (units made and plan built in {s['plan_seconds']:.2f} s, payloads "
              f"pickled in {s['payload_seconds']:.2f} s); {s['units_per_rank']['min']}-{s['units_per_rank']['max']} "
              f"files per rank\n"
              f"  plan step: each rank receives {b['min']}-{b['max']} B (median {b['median']:.0f}; padded to "
              f"{s['bytes_received_per_rank_padded']} B), the coordinator sends "
              f"{s['coordinator_sends_bytes'] / 1e6:.1f} MB in all; the whole plan is "
              f"{s['whole_plan_bytes'] / 1e6:.1f} MB (the plan without unit lists {s['light_plan_bytes']} B)\n"
              f"  merge step: each rank sends its results to the coordinator only ({s['results_bytes_per_rank']['max']}"
              f" B at most; {s['coordinator_receives_result_bytes'] / 1e6:.1f} MB received there) and all-gathers "
              f"{s['failure_flag_bytes_per_rank']} B of failure flags", flush=True)
    if real:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            result["real_files"] = real_files(real, world_size, min(num_checkpoints, 2), work or scratch, profile)
        if verbose:
            r = result["real_files"]
            print(f"  real Megatron legacy planning: {r['checkpoints']} checkpoints x {r['files_per_checkpoint']} "
                  f"shard files (TP/PP/EP {'/'.join(map(str, r['layout']))}), {world_size} ranks: plan_merge "
                  f"{r['plan_merge_seconds']:.2f} s warm, {r['first_pass_seconds']:.2f} s on the first pass "
                  f"({r['files_snapshotted']} files snapshotted; each checkpoint's "
                  f"metadata read {r['metadata_reads_per_checkpoint']}x); generated in {r['make_seconds']:.0f} s\n"
                  f"    of which: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases_seconds"].items()), flush=True)
    if dcp:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            result["dcp"] = dcp_chunks(dcp, world_size, min(num_checkpoints, 2), scratch, profile=profile)
        if verbose:
            r = result["dcp"]
            b = r["bytes_per_rank"]
            print(f"  DCP planning: {r['checkpoints']} FSDP2 checkpoints x {r['chunks_per_checkpoint']} chunks "
                  f"({r['tensors']} tensors over {r['saved_world_size']} files; .metadata "
                  f"{r['metadata_bytes'] / 1e6:.0f} MB each), {world_size} ranks: plan_merge "
                  f"{r['plan_merge_seconds']:.2f} s; metadata parses per file {r['metadata_parses']} "
                  f"({r['metadata_files_read']} files); generated in {r['make_seconds']:.0f} s\n"
                  f"    of which: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases_seconds"].items()) + "\n"
                  f"  plan step: each rank receives {b['min']}-{b['max']} B (median {b['median']:.0f}), "
                  f"pickled in {r['payload_seconds']:.2f} s", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, default=4096)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--real-files", type=int, default=0, help="also plan a real run of this many shard files")
    parser.add_argument("--dcp-chunks", type=int, default=0,
                        help="also plan 2 DCP checkpoints (fewer if --checkpoints says so) of this many chunks each "
                             "(e.g. 1000000)")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                        help="the synthetic plan (--no-synthetic: only the real planning parts)")
    parser.add_argument("--work", default=None, help="where the real run is generated (kept: default a temp dir)")
    parser.add_argument("--profile", action="store_true", help="cProfile the real planning")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.files, args.ranks, args.checkpoints, args.real_files, args.work, args.profile,
                     dcp=args.dcp_chunks, with_synthetic=args.synthetic)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
