"""``pmm-dist merge`` (or ``watch``) on every rank of a torchrun world, counting each rank's
``.metadata`` parses.

    torchrun --standalone --nproc-per-node=2 tests/dcp_real/count_metadata_reads.py REPORT merge|watch ARGS...

Every rank counts the calls of ``pmm_dist.formats.dcp.load_metadata`` (the one reader of a
``.metadata``; Megatron torch_dist reads through it too) by checkpoint directory, and writes
REPORT.rank<R>.json: {"exit": the CLI's exit code, "parses": {checkpoint dir: count}}.
"""
import json
import os
import sys
from collections import Counter

import pmm_dist.formats.dcp as dcp
from pmm_dist.cli import main


def run(report: str, command_args) -> int:
    parses = Counter()
    load = dcp.load_metadata

    def counted(ckpt_dir):
        parses[os.path.abspath(ckpt_dir)] += 1
        return load(ckpt_dir)
    dcp.load_metadata = counted  # looked up at call time by the format's memoised reader
    code = main(list(command_args))
    with open(f"{report}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"exit": code, "parses": parses}, f)
    return code


if __name__ == "__main__":
    code = run(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    # As pmm_dist's own entry point (pmm_dist.cli.entry) exits, and for its reason: a normal
    # interpreter teardown with gloo's threads alive aborts now and then ("terminate called
    # without an active exception").
    os._exit(code)
