"""What every test module shares: the one way to start other processes, the tiers, and fixtures.

Running processes: ``run_python`` runs ``python ARGS`` (a module or one of the real-framework
harnesses), alone or as ``nproc`` ranks under ``torchrun --standalone``; ``run_cli`` is the same
for ``python -m pmm_dist ...``; ``start_python`` starts one without waiting (a helper process that
talks over stdin). They are plain functions, imported by the modules (``from .conftest import run_cli``),
because module-scoped fixtures, thread pools and helper functions call them too.

Tiers: every test carries exactly one of the markers ``unit`` (in this process, seconds),
``multiprocess`` (the CLI in subprocesses, torchrun and gloo worlds) or ``real`` (real DeepSpeed
engines, megatron-core models, FSDP2 training); ``gpu`` marks tests that need CUDA and is skipped
without it. The tier of a module is set in ``MODULE_TIERS`` below; a test marked with a tier
itself (in a module that mixes tiers) keeps its own.

    python -m pytest -m unit            # seconds (~25 s on 2 busy cores)
    python -m pytest -m multiprocess    # minutes (~3.5 min)
    python -m pytest -m real            # minutes (~4 min)
"""
import os
import pathlib
import shutil
import subprocess
import sys
import warnings
from typing import Dict, Optional, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
# Set by a launcher for its children: a test session started under one (or an engine test that
# set them in this process) must not hand them down, or the child would take itself for a rank of
# that launch.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_OUTPUT_TAIL = 6000

TIERS = ("unit", "multiprocess", "real")
MODULE_TIERS = {
    "test_collective": "unit",        # its gloo-world tests are marked multiprocess one by one
    "test_dcp_planner": "unit",
    "test_deepspeed_format": "unit",
    "test_hf_errors": "unit",         # but one test runs the CLI
    "test_hf_units": "unit",
    "test_kernel": "unit",
    "test_methods": "unit",
    "test_planner": "unit",
    "test_scale": "unit",             # plan payloads and metadata reads at 1024-4096 ranks, in process
    "test_selection": "unit",
    "test_staging": "unit",
    "test_atomic": "unit",
    "test_execution": "unit",
    "test_tree": "unit",
    "test_torch_save_stream": "unit",
    "test_zero3_partitions": "unit",
    "test_watch_forms": "unit",
    "test_watch_masters": "unit",     # in this process, but merges and watches 5 checkpoints 3 ways
    "test_regions": "unit",
    "test_dcp_layouts": "unit",
    "test_dcp_optimizer": "unit",
    "test_optimizer_merge": "unit",   # in-process merges of synthetic Megatron optimizer states
    "test_hf_merge": "multiprocess",  # but the tests that merge in this process are unit
    "test_megatron_errors": "multiprocess",
    "test_megatron_merge": "multiprocess",
    "test_multinode": "multiprocess",  # two torchrun "nodes" of 2 ranks each, c10d rendezvous
    "test_resilience": "multiprocess",
    "test_safety": "multiprocess",    # issue 15's contracts through the CLI
    "test_startup": "multiprocess",   # what `pmm-dist --help` imports, in a fresh interpreter
    "test_watch_cli": "multiprocess",
    "test_watch_resilience": "multiprocess",
    "test_verify_inspect": "multiprocess",
    "test_megatron_layouts": "multiprocess",
    "test_dcp_merge": "real",
    "test_deepspeed_real": "real",
    "test_deepspeed_layouts_real": "real",
    "test_dcp_layouts_real": "real",
    "test_dcp_optimizer_real": "real",
    "test_megatron_dist_layouts": "real",
    "test_watch_formats": "real",     # real FSDP2 and megatron-core runs among its formats
    "test_deepspeed_optimizer_real": "real",
    "test_megatron_core_real": "real",
    "test_megatron_dist_real": "real",
    "test_megatron_dist_optimizer_real": "real",
    "test_megatron_optimizer_real": "real",
    "test_pma_smoke": "real",
}
_UNLISTED_TIER = "multiprocess"  # a module not in the table yet: kept out of the fast tier


# -- other processes ------------------------------------------------------------------------------
def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment for a child: one OMP thread (ranks share two cores), this
    checkout first on the path, Python's own warnings silenced (the tests read pmm_dist's
    messages, which it prints itself), no launcher variables; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    env.update(extra or {})
    return env


def command(args: Sequence, *, nproc: Optional[int] = None, launcher: Optional[Sequence] = None) -> list:
    """``python ARGS``; with ``nproc`` the same as that many ranks under torchrun (``--standalone``:
    a free rendezvous port each, so concurrent test runs do not collide; ``nproc=1`` too, for a
    harness that needs a process group of one); ``launcher``: another command prefix under test
    (the deepspeed launcher, mpiexec), ARGS appended."""
    if launcher is not None:
        prefix = list(launcher)
    elif nproc is None:
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [str(part) for part in (*prefix, *args)]


def run_python(args: Sequence, *, nproc: Optional[int] = None, launcher: Optional[Sequence] = None,
               env: Optional[Dict[str, str]] = None, check: Optional[str] = None,
               timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the repository and wait; returns the CompletedProcess (text output).

    ``check``: what the run is, for the message; given, the run must succeed, and a failure shows
    the command and the tails of its output.
    """
    cmd = command(args, nproc=nproc, launcher=launcher)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == 0, (
            f"{check} failed with exit code {proc.returncode}\ncommand: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-_OUTPUT_TAIL:]}\n--- stderr ---\n{proc.stderr[-_OUTPUT_TAIL:]}")
    return proc


def run_cli(args: Sequence, *, world_size: int = 1, **kwargs) -> subprocess.CompletedProcess:
    """``python -m pmm_dist ARGS``: one plain process, or ``world_size`` ranks under torchrun."""
    return run_python(["-m", "pmm_dist", *args], nproc=None if world_size == 1 else world_size, **kwargs)


def start_python(args: Sequence, *, env: Optional[Dict[str, str]] = None,
                 launcher: Optional[Sequence] = None) -> subprocess.Popen:
    """``python ARGS`` (or ``launcher ARGS``, see ``command``) started with pipes for stdin, stdout
    and stderr (text); the caller waits."""
    return subprocess.Popen(command(args, launcher=launcher), cwd=REPO, env=subprocess_env(env),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- shared fixtures ------------------------------------------------------------------------------
@pytest.fixture
def fresh_copy(tmp_path):
    """``fresh_copy(src)``: a copy of the directory ``src`` at tmp_path/run, for one test to damage
    (the module-scoped original stays pristine); a str for a str, a Path for a Path."""
    def copy(src, name: str = "run"):
        target = tmp_path / name
        shutil.copytree(src, target)
        return target if isinstance(src, pathlib.PurePath) else str(target)
    return copy


# -- tiers ----------------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            module = item.module.__name__.rsplit(".", 1)[-1]
            tier = MODULE_TIERS.get(module)
            if tier is None:
                warnings.warn(f"{module} has no tier in tests/conftest.py MODULE_TIERS; "
                              f"treated as {_UNLISTED_TIER}", pytest.PytestWarning)
                tier = _UNLISTED_TIER
            item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch
                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
