"""What `pmm-dist --help` imports: the command line is built without torch, numba or any format
(the start-up time itself is a benchmark, benchmarks/startup.py, not a test)."""
import json

import pytest
import torch

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


def test_detecting_a_non_dcp_run_does_not_import_torch_distributed_checkpoint(tmp_path):
    """Detection asks every format, torch_dist and DCP included; torch.distributed.checkpoint
    (~0.6 s of imports) must be paid only by a DCP or torch_dist merge."""
    from pmm_dist.testing.synthetic import generate_run
    run = tmp_path / "run"
    generate_run(str(run), iterations=[10], tp=1, pp=1, ep=1, num_layers=2, hidden_size=8, ffn_hidden_size=16,
                 num_experts=0, vocab_size=32, optimizer_state=False)
    probe = ("import sys\nfrom pmm_dist.formats import resolve_format\n"
             f"fmt = resolve_format('auto', [{str(run)!r}])\n"
             "fmt.discover([" + repr(str(run)) + "])\n"
             "print(fmt.name, 'torch.distributed.checkpoint' in sys.modules)")
    assert run_python(["-c", probe], check="the detection probe").stdout.split()[-2:] == ["megatron", "False"]


def test_reading_deepspeed_s_classes_does_not_import_deepspeed(tmp_path):
    """A DeepSpeed optimizer file pickles DeepSpeed's loss scaler, ZeRO stage and fragment
    addresses; reading them must not cost ``import deepspeed`` (0.33 s) in a merge."""
    from .test_deepspeed_format import _deepspeed_objects
    path = tmp_path / "optim_states.pt"
    torch.save(_deepspeed_objects(), path)
    probe = ("import sys\nimport pmm_dist.formats.deepspeed\nfrom pmm_dist.io.safe_load import safe_load\n"
             f"state = safe_load({str(path)!r})\n"
             "print(type(state['static']).__name__, state['optimizer_state_dict']['zero_stage'] == 2, "
             "'deepspeed' in sys.modules)")
    assert run_python(["-c", probe], check="the DeepSpeed load probe").stdout.split()[-3:] == \
        ["LossScaler", "True", "False"]
