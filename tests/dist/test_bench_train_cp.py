"""``longreach bench train --cp 2`` runs under torchrun on 2 CPU ranks (gloo): ZeRO-3, ring attention over the
context-parallel pair, global tokens/s and the config in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("strategy", ["ring"])
def test_bench_train_context_parallel_two_ranks(tmp_path, strategy):
    from longreach.launch.dist import free_port

    out = tmp_path / "train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "longreach.launch.bench.train", "--model", "random", "--layers", "2", "--seq-len", "64",
           "--zero", "3", "--cp", "2", "--strategy", strategy, "--steps", "1", "--warmup", "1", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    c = data["config"]
    assert c["cp"] == 2 and c["strategy"] == strategy and c["world"] == 2 and c["attention"] == strategy
    assert data["hf"] is None and data["ours"]["tokens_per_s"] > 0 and data["ours"]["peak_mem_bytes"] > 0
    assert c["params"] > 0 and c["flops_per_token"] > 0
    assert len(data["ours"]["losses"]) == 2 and all(x > 0 for x in data["ours"]["losses"])
