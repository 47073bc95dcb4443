"""``pmm-dist inspect RUN``: a run's checkpoints, format, layout and sizes, read-only.

Every checkpoint's own parallel layout is shown, and the checkpoints where it changes are
marked: a merge across such a change is either supported by the format (the output takes
the newest's layout) or refused in one message that lists the same groups.
"""
import json
import os
import sys
from typing import List

from ..errors import InputError, MergeError
from ..formats import resolve_format
from ..engine.report import human_bytes


def describe_run(sources: List[str], format_name: str = "auto") -> dict:
    """The checkpoints of a run: format, parallel layout (the newest's and each checkpoint's,
    with ``layout_changed`` where it differs from the one before), iterations and sizes."""
    for src in sources:
        if not os.path.exists(src):
            raise InputError(f"{src}: no such file or directory")
    fmt = resolve_format(format_name, sources)
    checkpoints = fmt.discover(sources)
    if not checkpoints:
        raise MergeError(f"no checkpoints found in {', '.join(sources)}")
    rows = []
    for ckpt in checkpoints:
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt.path) for f in fs]
        layout = fmt.checkpoint_layout(ckpt)
        rows.append({"iteration": ckpt.iteration, "path": ckpt.path, "files": len(sizes), "bytes": sum(sizes),
                     "layout": layout, "layout_changed": bool(rows) and layout != rows[-1]["layout"],
                     "problems": fmt.checkpoint_problems(ckpt)})
    newest_ok = not rows[-1]["problems"]
    return {"format": fmt.name, "layout": fmt.layout(checkpoints) if newest_ok else {}, "checkpoints": rows,
            "layout_changes": [r["iteration"] for r in rows if r["layout_changed"]]}


def format_run_description(info: dict) -> str:
    changes = info["layout_changes"]
    lines = [f"format: {info['format']}",
             "layout: " + ", ".join(f"{k}={v}" for k, v in info["layout"].items()) +
             (" (newest)" if changes else ""),
             f"checkpoints: {len(info['checkpoints'])}" +
             (f"; layout changes at iteration {', '.join(map(str, changes))}" if changes else ""),
             f"  {'iteration':>10}  {'files':>5}  {'size':>10}  layout  path"]
    for r in info["checkpoints"]:
        layout = ", ".join(f"{k}={v}" for k, v in r["layout"].items())
        mark = "  <- layout changes" if r["layout_changed"] else ""
        lines.append(f"  {r['iteration']:>10}  {r['files']:>5}  {human_bytes(r['bytes']):>10}  [{layout}]  "
                     f"{r['path']}{mark}")
        lines += [f"      PROBLEM: {problem}" for problem in r["problems"]]
    return "\n".join(lines)


def run_inspect(args) -> int:
    try:
        info = describe_run(args.sources, args.format)
    except MergeError as exc:
        print(f"pmm-dist: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if args.json else format_run_description(info))
    broken = [r["path"] for r in info["checkpoints"] if r["problems"]]
    if broken:
        print(f"pmm-dist: error: {len(broken)} checkpoint(s) incomplete or unreadable: {', '.join(broken)}",
              file=sys.stderr)
        return 1
    return 0
