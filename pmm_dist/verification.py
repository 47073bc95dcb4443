"""``pmm-dist verify OUT`` and ``pmm-dist inspect RUN``: read-only checks and listings."""
import json
import os
from typing import List

from .atomic import sha256_of_file
from .errors import InputError, MergeError
from .formats import FORMATS, resolve_format
from .report import human_bytes
from .staging import STAGING

MANIFEST = "pmm_manifest.json"


def verify_output(out: str, *, check_sources: bool = True) -> List[str]:
    """Problems found in a merged output, compared with its manifest (empty list: all good).

    Checks the manifest and tracker exist, every listed file has its size and sha256, no
    unlisted file sits in the checkpoint, and (when the sources are still there and the format
    can list tensors) the output's float tensors have the newest source's names, shapes, dtypes.
    """
    manifest_path = os.path.join(out, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return [f"{manifest_path}: missing (not a pmm_dist output, or the merge never committed)"]
    except json.JSONDecodeError as exc:
        return [f"{manifest_path}: not valid JSON ({exc})"]
    problems = []
    tracker = os.path.join(out, manifest.get("tracker", ""))
    if not manifest.get("tracker") or not os.path.exists(tracker):
        problems.append(f"{tracker}: tracker missing: the output is not loadable")
    listed = set()
    for entry in manifest.get("files", []):
        path = os.path.join(out, entry["path"])
        listed.add(os.path.normpath(path))
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{path}: size {os.path.getsize(path)} != {entry['bytes']} in the manifest")
        elif sha256_of_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified)")
    checkpoint_dir = os.path.join(out, manifest.get("output_checkpoint", ""))
    ignored = {os.path.normpath(manifest_path), os.path.normpath(tracker)}
    for directory, dirs, files in os.walk(checkpoint_dir):
        if directory == os.path.normpath(out):
            dirs[:] = [d for d in dirs if d != STAGING]
        for name in files:
            path = os.path.normpath(os.path.join(directory, name))
            if path not in listed and path not in ignored:
                problems.append(f"{path}: not listed in the manifest")
    if os.path.exists(os.path.join(out, STAGING)):
        problems.append(f"{os.path.join(out, STAGING)}: an unfinished merge's staging area is still present")
    if check_sources and not problems:
        problems += _compare_with_newest_source(manifest, checkpoint_dir)
    return problems


def _compare_with_newest_source(manifest: dict, checkpoint_dir: str) -> List[str]:
    fmt_class = FORMATS.get(manifest.get("format"))
    sources = manifest.get("sources") or []
    if fmt_class is None or not sources or not os.path.isdir(sources[-1]["path"]):
        return []
    fmt = fmt_class()
    newest = sources[-1]["path"]
    try:
        expected = fmt.tensor_inventory(newest)
        actual = fmt.tensor_inventory(checkpoint_dir)
    except InputError as exc:
        return [str(exc)]
    if expected is None or actual is None:
        return []
    problems = [f"{checkpoint_dir}: tensor '{k}' missing (present in the source {newest})"
                for k in sorted(expected.keys() - actual.keys())]
    problems += [f"{checkpoint_dir}: unexpected tensor '{k}' (absent from the source {newest})"
                 for k in sorted(actual.keys() - expected.keys())]
    problems += [f"{checkpoint_dir}: tensor '{k}' is {actual[k]} but {expected[k]} in the source {newest}"
                 for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]]
    return problems


def describe_run(sources: List[str], format_name: str = "auto") -> dict:
    """The checkpoints of a run: format, parallel layout, iterations and sizes."""
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
        rows.append({"iteration": ckpt.iteration, "path": ckpt.path, "files": len(sizes), "bytes": sum(sizes)})
    return {"format": fmt.name, "layout": fmt.layout(checkpoints), "checkpoints": rows}


def format_run_description(info: dict) -> str:
    lines = [f"format: {info['format']}",
             "layout: " + ", ".join(f"{k}={v}" for k, v in info["layout"].items()),
             f"checkpoints: {len(info['checkpoints'])}",
             f"  {'iteration':>10}  {'files':>5}  {'size':>10}  path"]
    lines += [f"  {r['iteration']:>10}  {r['files']:>5}  {human_bytes(r['bytes']):>10}  {r['path']}"
              for r in info["checkpoints"]]
    return "\n".join(lines)
