"""Two "nodes" on this machine: two torchrun agents (--nnodes 2, distinct --node-rank, c10d
rendezvous on localhost) of 2 ranks each merge one synthetic Megatron run; the output is byte
for byte that of one process."""
import json
import os
import socket
import sys
import uuid

import pytest

from pmm_dist.testing.synthetic import generate_run

from .conftest import TIMEOUT_S, run_cli, start_python
from .helpers import shard_files

NODES, RANKS_PER_NODE = 2, 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _node_launcher(node_rank: int, port: int, job: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--node-rank", str(node_rank),
            "--nproc-per-node", str(RANKS_PER_NODE), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"localhost:{port}", "--rdzv-id", job, "--max-restarts", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    # TP=2 x PP=2 x EP=2: 8 shard files, two for each of the 4 ranks
    generate_run(run, iterations=[100, 200, 300], tp=2, pp=2, ep=2, num_layers=4, hidden_size=32,
                 ffn_hidden_size=64, num_experts=4, vocab_size=64)
    return run


def test_two_nodes_of_two_ranks_match_one_process(run_dir, tmp_path):
    merge = ["-m", "pmm_dist", "merge", run_dir, "--method", "ema", "--alpha", "0.3", "--device", "cpu"]
    single = str(tmp_path / "single")
    run_cli([*merge[2:], "--out", single], check="the 1-process merge")
    multi = str(tmp_path / "two_nodes")
    port, job = _free_port(), f"pmm-multinode-{uuid.uuid4().hex[:8]}"
    nodes = [start_python([*merge, "--out", multi], launcher=_node_launcher(k, port, job)) for k in range(NODES)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT_S))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for k, (node, (stdout, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {k} exited {node.returncode}\n--- stdout ---\n{stdout[-4000:]}\n" \
                                     f"--- stderr ---\n{stderr[-4000:]}"
    manifest = json.load(open(os.path.join(multi, "pmm_manifest.json")))
    assert manifest["world_size"] == NODES * RANKS_PER_NODE
    assert len(manifest["peak_rss_bytes_by_rank"]) == NODES * RANKS_PER_NODE
    assert "GB/s" in outputs[0][0] + outputs[1][0]  # the coordinator's summary, on whichever node has rank 0
    files = shard_files(os.path.join(single, "iter_0000300"))
    assert len(files) == 8 and files == shard_files(os.path.join(multi, "iter_0000300"))
    for rel in files:
        with open(os.path.join(single, "iter_0000300", rel), "rb") as a, \
                open(os.path.join(multi, "iter_0000300", rel), "rb") as b:
            assert a.read() == b.read(), f"{rel} differs between 1 process and 2 nodes x 2 ranks"
    for name in ("latest_checkpointed_iteration.txt",):
        assert open(os.path.join(single, name)).read() == open(os.path.join(multi, name)).read()
