from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="pmm_dist",
    version="0.1.0",
    description="Distributed, rank-local merging (PMA: SMA/WMA/EMA) of sharded Megatron-LM and DeepSpeed checkpoints",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pmm_dist", "pmm_dist.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned: pmm_dist installs into existing training environments
    # (any recent torch, CUDA builds included). Only launch/setup_env.sh pins the CPU wheel.
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    extras_require={
        "deepspeed": ["deepspeed"],
        "mpi": ["mpi4py"],
        "hf": ["safetensors"],
        # compiled merge kernels (pmm_dist/merge/fused.py), ~3x the pure-torch fallback on the CPU;
        # ISA-L's CRC-32 for checking the sources' records (io/record_check.py), ~4x zlib's
        "fast": ["numba>=0.60", "isal>=1.6"],
        "test": ["pytest", "pytest-xdist", "megatron-core", "deepspeed", "mpi4py", "safetensors", "psutil", "numba>=0.60",
                 "isal>=1.6"],
    },
    entry_points={"console_scripts": ["pmm-dist=pmm_dist.cli:entry"]},
)
