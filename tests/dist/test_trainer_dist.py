"""2 processes (torchrun, gloo): per-step losses of ZeRO-1/2/3 data parallel, with grad accumulation, and of a
sequence-parallel split (dp=1 x sp=2, through DeepSpeed's mpu) equal one process on the same global batch.

Rows carry different numbers of real tokens, so ranks and micro-batches hold different token counts: a
per-rank or per-micro-batch mean would give different losses and gradients after step 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("trainer_runner", HERE / "trainer_runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

COMMON = ["train.steps=3", "train.lr=1e-2", "train.warmup_steps=1"]
RUNS = {
    "zero1": ("dp", ["train.zero_stage=1", "data.batch_size=2"]),
    "zero2_accum": ("dp", ["train.zero_stage=2", "data.batch_size=1", "train.grad_accum=2"]),
    "zero3": ("dp", ["train.zero_stage=3", "data.batch_size=2"]),
    "sp2_zero2": ("sp", ["train.zero_stage=2", "data.batch_size=4", "parallel.cp=2"]),
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_two_ranks_match_one(tmp_path):
    from longreach.launch.dist import free_port, init_distributed

    spec = {"runs": [{"out": str(tmp_path), "name": n, "mode": m, "rows": 4, "overrides": COMMON + o}
                     for n, (m, o) in RUNS.items()]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "trainer_runner.py"), str(tmp_path / "spec.json")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # the one-process reference runs here while the two ranks start up
    ref = runner.run_one({"out": str(tmp_path), "name": "ref", "mode": "ref", "rows": 4,
                          "overrides": COMMON + ["data.batch_size=4"]}, init_distributed())
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    ref_loss = [m["loss"] for m in ref]
    assert len(set(m["tokens"] for m in ref)) > 1  # token counts differ by step (and by rank/row)
    for name in RUNS:
        got = json.loads((tmp_path / name / "result.json").read_text())
        assert [m["tokens"] for m in got] == [m["tokens"] for m in ref], name
        assert [m["loss"] for m in got] == pytest.approx(ref_loss, rel=1e-5, abs=0), name
        assert [m["grad_norm"] for m in got] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-4), name
