"""Kill/resume: SIGKILL right after step k's checkpoint is complete, resume, and the per-step losses of the
resumed run equal an uninterrupted run's exactly (same weights, optimizer state, LR position, data position)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
OVERRIDES = ["train.steps=4", "train.save_every=1", "train.lr=1e-2", "train.warmup_steps=1", "train.zero_stage=1",
             "data.batch_size=2", "train.grad_accum=2"]


def _run(tmp_path, name, runs):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs}))
    # a fresh single-process job: drop the launcher variables an in-process test may have set in this process
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, str(HERE / "trainer_runner.py"), str(spec)], env=env,
                          capture_output=True, text=True, timeout=240)


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path):
    base = {"out": str(tmp_path), "mode": "ref", "rows": 4, "overrides": OVERRIDES}
    # one process runs the uninterrupted job, then the job that kills itself after step 2's checkpoint
    p = _run(tmp_path, "first", [{**base, "name": "full"}, {**base, "name": "killed", "kill_after_step": 2}])
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-4000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    p = _run(tmp_path, "resume", [{**base, "name": "killed"}])
    assert p.returncode == 0, p.stderr[-4000:]
    full = json.loads((tmp_path / "full" / "result.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]  # exact
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full]
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
