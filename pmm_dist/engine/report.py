"""What the user sees: the progress bar, peak memory, the --dry-run plan and the closing summary."""
import resource
import sys
from typing import Optional

from tqdm import tqdm


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory.
    getrusage's ru_maxrss survives exec, so a rank started by a large parent (a launcher, a
    benchmark driver) would report the parent's peak instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage * 1024 if sys.platform != "darwin" else usage


def progress_bar(total_bytes: int, *, enabled: bool, description: str) -> Optional[tqdm]:
    if not enabled:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)



def human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} TiB"


def format_summary(result) -> str:
    """The closing summary printed by the CLI (rank 0)."""
    plan = result.plan
    lines = [
        f"pmm_dist {plan.method} merge of {len(plan.checkpoints)} {plan.format_name} checkpoints "
        f"(iterations {', '.join(str(c.iteration) for c in plan.checkpoints)})",
        f"  weights (oldest first): {', '.join(f'{w:.6g}' for w in plan.weights)}",
        f"  layout: {', '.join(f'{k}={v}' for k, v in plan.layout.items())}",
        f"  world size: {result.world_size}, device: {result.device}",
        f"  files written: {len(result.files)} ({result.num_tensors_merged} tensors merged)" +
        (f"; {result.num_units_resumed} files were finished by the interrupted run and are not counted below"
         if result.num_units_resumed else ""),
        f"  bytes read: {human_bytes(result.num_bytes_read)}, written: {human_bytes(result.num_bytes_written)}" +
        (f" (rank 0 read {human_bytes(result.bytes_read_by_rank[0])})" if len(result.bytes_read_by_rank) > 1 else ""),
        f"  time: {result.timings['total']:.2f} s (merge {result.timings['merge']:.2f} s), "
        f"throughput: {result.read_gbps:.3f} GB/s read, {result.write_gbps:.3f} GB/s written",
        "  peak RSS per rank: " + ", ".join(human_bytes(b) for b in result.peak_rss_by_rank),
        f"  metadata exchanged between ranks: {human_bytes(result.metadata_bytes_exchanged)}",
        f"  model weights from: {result.model_weights_from}; --optimizer {plan.optimizer_policy}",
    ]
    lines += [f"    {note}" for note in result.model_weights_notes[:3]]
    if len(result.model_weights_notes) > 3:
        lines.append(f"    ... and {len(result.model_weights_notes) - 3} more (see the manifest)")
    lines.append(f"  output: {result.output_path}")
    return "\n".join(lines)


def format_source_layouts(checkpoints, layouts, indent: str = "  ") -> list:
    """Each source's parallel layout, with the places where it changes marked (the output
    takes the newest's)."""
    lines = [f"{indent}source layouts (oldest first; the output takes the newest's):"]
    for i, (ckpt, layout) in enumerate(zip(checkpoints, layouts)):
        changed = "  <- layout changes" if i and layout != layouts[i - 1] else ""
        lines.append(f"{indent}  {ckpt.iteration:>10}  {', '.join(f'{k}={v}' for k, v in layout.items())}{changed}")
    return lines


def format_plan(plan) -> str:
    """The --dry-run report: what would be read, merged and written, and by which rank."""
    lines = [f"plan: {plan.method} merge of {len(plan.checkpoints)} {plan.format_name} checkpoints -> {plan.out}",
             f"  layout: {', '.join(f'{k}={v}' for k, v in plan.layout.items())}",
             "  checkpoints (oldest first) and weights:"]
    reads = plan.bytes_read_by_source or [None] * len(plan.checkpoints)
    lines += [f"    {ckpt.iteration:>10}  w={w:.6g}  {ckpt.path}"
              + ("" if num is None else f"  (reads {human_bytes(num)})")
              for ckpt, w, num in zip(plan.checkpoints, plan.weights, reads)]
    lines.append(f"  weights sum: {sum(plan.weights):.6g}")
    if plan.model_weights_from:
        lines.append(f"  model weights from: {plan.model_weights_from} (--optimizer {plan.optimizer_policy})")
    lines += format_source_layouts(plan.checkpoints, plan.source_layouts)
    for rank, share in enumerate(plan.shares):
        num_bytes = sum(u.num_bytes for u in share)
        lines.append(f"  rank {rank}: {len(share)} files, {human_bytes(num_bytes)} to write, "
                     f"~{human_bytes(num_bytes * len(plan.checkpoints))} to read")
        lines += [f"      {u.action:5} {u.relpath} ({human_bytes(u.num_bytes)})" for u in share[:8]]
        if len(share) > 8:
            lines.append(f"      ... {len(share) - 8} more")
    total = sum(u.num_bytes for u in plan.units)
    lines.append(f"  total: {len(plan.units)} files, {human_bytes(total)} to write; nothing written (--dry-run)")
    return "\n".join(lines)
