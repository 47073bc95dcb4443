#!/usr/bin/env bash
# Create (or update) .venv in the repository root with the pinned CPU stack and pmm_dist itself.
# Idempotent: a second run only checks what is installed. Pins are for these CPU machines only;
# `pip install .` into an existing training environment pins nothing (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first: anything installed before it would pull the newest CUDA build (several GB).
pip install -q --disable-pip-version-check torch==2.13.0
echo "torch==2.13.0" > constraints.txt
export PIP_CONSTRAINT="$PWD/constraints.txt" DS_BUILD_OPS=0
pip install -q --disable-pip-version-check \
    deepspeed==0.19.8 megatron-core==0.16.1 mpi4py==4.1.2 mpich==5.0.2 \
    numpy==2.4.6 tqdm==4.70.1 safetensors==0.8.0 psutil==7.2.2 pytest==9.2.0 pytest-xdist==3.8.0 matplotlib==3.11.2
# Optional (setup.py extra "fast"): the compiled merge kernels, without which the pure-torch kernel
# runs, and ISA-L's CRC-32 for checking the sources' records (else zlib's, about a quarter as fast).
pip install -q --disable-pip-version-check numba==0.68.1 llvmlite==0.50.0 isal==1.9.1
# Test-only: tests/test_hf_merge.py compares with mergekit's linear merge (adds transformers, accelerate).
pip install -q --disable-pip-version-check mergekit==0.1.5
pip install -q --disable-pip-version-check -e .
python -c "import torch, pmm_dist; print(f'environment ready: torch {torch.__version__}, pmm_dist {pmm_dist.__version__}')"
