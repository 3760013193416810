"""Context parallelism in the trainer, end to end (torchrun, gloo): the same tiny model, weights and global batches
trained 3 steps under CP (and dp x cp) through ``setup_parallel`` + ``Trainer`` give the per-step losses (1e-5,
fp32), token counts and gradient norms of one process with 'dense' attention.

Cases (a subset of strategy x ZeRO stage x layout that covers each of them; every batch holds packed documents
of odd and even lengths, uneven real-token counts per shard, and SEQ=37, which no CP degree divides, so every
CP run pads):

  2 ranks  ring    cp=2            ZeRO-1
  2 ranks  ulysses cp=2 (U=2)      ZeRO-3, 2 micro-batches per step
  4 ranks  ring    cp=4            ZeRO-3
  4 ranks  hybrid  cp=4 (R=2, U=2) ZeRO-1
  4 ranks  ring    dp=2 x cp=2     ZeRO-3
  4 ranks  ulysses dp=2 x cp=2     ZeRO-1, 2 micro-batches per step

Then bad input (before any step) and the CLI: ``torchrun --nproc_per_node 2 -m longreach.launch.cli train ...
parallel.cp=2`` on the embedded model cut to one layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("cp_trainer_runner", HERE / "cp_trainer_runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

from longreach.errors import ConfigError  # noqa: E402
from longreach.launch.config import load_config  # noqa: E402
from longreach.launch.dist import DistInfo, free_port  # noqa: E402
from longreach.parallel.setup import cp_model_config, setup_parallel  # noqa: E402

CP2 = ["parallel.cp=2"]
ULY2 = ["parallel.cp=2", "parallel.strategy=ulysses", "parallel.ulysses=2"]
RUNS = {
    2: {
        "ring2_z1": (["train.zero_stage=1", "data.batch_size=4", *CP2], "ring"),
        "ulysses2_z3_accum": (["train.zero_stage=3", "data.batch_size=2", "train.grad_accum=2", *ULY2], "ulysses"),
    },
    4: {
        "ring4_z3": (["train.zero_stage=3", "data.batch_size=4", "parallel.cp=4"], "ring"),
        "hybrid4_z1": (["train.zero_stage=1", "data.batch_size=4", "parallel.cp=4", "parallel.strategy=hybrid",
                        "parallel.ulysses=2"], "hybrid"),
        "dp2_ring2_z3": (["train.zero_stage=3", "data.batch_size=2", *CP2], "ring"),
        "dp2_ulysses2_z1_accum": (["train.zero_stage=1", "data.batch_size=1", "train.grad_accum=2", *ULY2], "ulysses"),
    },
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]


def _launch(tmp_path: Path, world: int) -> subprocess.Popen:
    spec = {"runs": [{"out": str(tmp_path), "name": n, "overrides": o} for n, (o, _) in RUNS[world].items()]}
    path = tmp_path / f"spec{world}.json"
    path.write_text(json.dumps(spec))
    return subprocess.Popen(_torchrun(world, str(HERE / "cp_trainer_runner.py"), str(path)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cp_trainer_matches_one_process(tmp_path):
    from longreach.launch.dist import init_distributed

    two = _launch(tmp_path, 2)
    # the one-process reference ('dense', the whole global batch) runs here while the ranks start up
    ref = runner.run_one({"out": str(tmp_path), "name": "ref", "overrides": ["train.zero_stage=1", "data.batch_size=4"]},
                         init_distributed())
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out[-4000:]
    four = _launch(tmp_path, 4)  # after the 2-rank job: 6 processes at once would only fight over 2 cores
    out, _ = four.communicate(timeout=300)
    assert four.returncode == 0, out[-4000:]

    assert len({m["tokens"] for m in ref}) == 3  # each step holds a different number of real tokens
    report = {}
    for world in RUNS:
        for name, (_, attention) in RUNS[world].items():
            got = json.loads((tmp_path / name / "result.json").read_text())
            hist = got["history"]
            assert got["attention"] == [attention] * 2, name  # 'dense' became the strategy's registry name
            assert [m["tokens"] for m in hist] == [m["tokens"] for m in ref], name
            loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(hist, ref))
            assert loss_diff <= 1e-5, f"{name}: losses {[m['loss'] for m in hist]} vs {[m['loss'] for m in ref]}"
            assert [m["grad_norm"] for m in hist] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-4), name
            report[name] = {"dp": got["dp"], "cp": got["cp"], "max_loss_diff": loss_diff}
    print(json.dumps(report, indent=1))


def _cfg(*overrides):
    return load_config(overrides=["tracking.wandb=false", "data.seq_len=64", *overrides])


def _fake_dist(world: int) -> DistInfo:
    # setup_parallel checks everything before it creates a group, so a world it is not part of is enough here
    return DistInfo(rank=0, world=world, local_rank=0, device=torch.device("cpu"))


def test_bad_parallel_input_fails_before_any_group():
    with pytest.raises(ConfigError, match=r"parallel.ulysses=2 does not divide the model's 3 attention heads"):
        setup_parallel(_cfg(*ULY2), _fake_dist(2), num_heads=3, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 does not divide the world size 3"):
        setup_parallel(_cfg(*CP2), _fake_dist(3), num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match=r"model.attention_layers=\{'0': 'dense'\} under parallel.cp=2"):
        base = _cfg(*CP2)
        cp_model_config(dataclasses.replace(base, model=dataclasses.replace(base.model, attention_layers={"0": "dense"})))
    with pytest.raises(ConfigError, match=r"model.attention='s2' does not match parallel.strategy='ring'.*parallel.cp=1"):
        cp_model_config(_cfg(*CP2, "model.attention=s2"))
    with pytest.raises(ConfigError, match=r"model.attention='ulysses' .* set model.attention=ring \(or dense\)"):
        cp_model_config(_cfg(*CP2, "model.attention=ulysses"))
    # the mapping: dense -> the strategy (idempotent); the strategy's own name is kept; cp=1 changes nothing
    cfg = cp_model_config(_cfg(*ULY2))
    assert cfg.model.attention == "ulysses" and cp_model_config(cfg) is cfg
    assert cp_model_config(_cfg(*CP2, "model.attention=ring")).model.attention == "ring"
    one = setup_parallel(_cfg("model.attention=s2"), _fake_dist(2), num_heads=3, num_kv_heads=1)
    assert (one.mesh, one.shard_fn, one.trainer_kwargs(), one.attention_name, one.dp) == (None, None, {}, "s2", 2)


CLI_COMMON = ["model.num_layers=1", "train.steps=2", "train.warmup_steps=0", "data.seq_len=61",
              "data.max_train_tokens=4096", "eval.ppl_lengths=[32]", "eval.ppl_max_tokens=64", "eval.passkey_lengths=[96]",
              "eval.passkey_depths=[0.5]", "eval.passkey_trials=1", "tracking.wandb=false", "tracking.progress=false"]


def test_cli_train_with_cp2(tmp_path):
    """The user's command on 2 ranks: trains (pad 61 -> 64, packed KJV text) and writes the run directory; a head
    count Ulysses cannot split fails before step 1 naming the field."""
    cmd = _torchrun(2, "-m", "longreach.launch.cli", "train", f"out_dir={tmp_path}", "name=cp2", *CLI_COMMON,
                    "parallel.cp=2")
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "cp2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 and m["grad_norm"] > 0 for m in lines)
    assert "model.attention='dense' becomes 'ring'" in p.stderr
    assert (tmp_path / "cp2" / "model" / "config.json").is_file()

    # SmolLM2 has 9 query heads: Ulysses over 2 ranks cannot split them
    cmd = _torchrun(2, "-m", "longreach.launch.cli", "train", f"out_dir={tmp_path}", "name=bad", *CLI_COMMON, *ULY2)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode != 0
    assert "config error: parallel.ulysses=2 does not divide the model's 9 attention heads" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
