"""``longreach bench cp`` runs end to end on 2 CPU ranks (torchrun) and writes a table and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("docs", ["none", "longtail"])
def test_bench_cp_two_ranks(tmp_path, docs):
    out = tmp_path / "cp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "longreach.launch.bench.cp", "--ranks", "2", "--tokens-per-rank", "37", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "8", "--iters", "1", "--warmup", "1", "--docs", docs, "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "TFLOP/s/rank" in res.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["world"] == 2 and data["meta"]["docs"] == docs
    rows = {r["name"]: r for r in data["rows"]}
    for s in ("ring", "ulysses", "hybrid"):
        row = rows[f"longreach {s}"]
        assert row["status"] == "ok" and row["fwd_bwd_ms"] > 0 and row["max_err"] < 1e-5, row
    # peers are listed whether or not they can run here (a reason instead of a time)
    assert {"torch native context_parallel", "yunchang LongContextAttention"} <= set(rows)
