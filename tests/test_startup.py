"""What `pmm-dist --help` imports: the command line is built without torch, numba or any format
(the start-up time itself is a benchmark, benchmarks/startup.py, not a test)."""
import json

import pytest

from .conftest import run_python

HEAVY = ("torch", "numpy", "numba", "safetensors", "tqdm", "pmm_dist.formats.base", "pmm_dist.merge.kernel",
         "pmm_dist.engine.run", "pmm_dist.dist.collective")


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["--version"], ["verify", "--help"]])
def test_help_imports_nothing_heavy(argv):
    probe = ("import json, sys\nfrom pmm_dist.cli import main\n"
             f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    proc = run_python(["-c", probe], check="the --help probe")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_api_still_loads_on_first_use():
    probe = ("import sys, pmm_dist\nassert 'torch' not in sys.modules\n"
             "from pmm_dist.merge import kernel\n"  # the subpackage must not shadow the function
             "assert callable(pmm_dist.merge) and pmm_dist.MergeOptions.__name__ == 'MergeOptions'\n"
             "from pmm_dist import MergePlan, MergeResult\nfrom pmm_dist.formats import CheckpointFormat\n"
             "print('ok')")
    assert run_python(["-c", probe], check="the API probe").stdout.strip().endswith("ok")
