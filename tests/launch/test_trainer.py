"""Single-process trainer tests (gloo, world 1): loss falls, metrics fields, NaN policies, atomic checkpoints,
bad input failing before step 1, LR schedule, W&B never blocking."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_spec = importlib.util.spec_from_file_location("trainer_runner", Path(__file__).parents[1] / "dist" / "trainer_runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

from longreach.launch.config import ConfigError, load_config  # noqa: E402
from longreach.launch.dist import DistInfo, init_distributed  # noqa: E402
from longreach.launch.metrics import METRIC_FIELDS, read_metrics  # noqa: E402
from longreach.launch.schedule import lr_multiplier  # noqa: E402
from longreach.launch.trainer import Trainer, check_run  # noqa: E402


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def make_cfg(tmp_path, name, *overrides):
    return load_config(overrides=[f"out_dir={tmp_path}", f"name={name}", "tracking.wandb=false", "tracking.progress=false",
                                  "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", *overrides])


def steps_stream(data_steps, rows=4, grad_accum=1):
    """Micro-batches of the given global data steps (grad_accum micro-batches each)."""
    for s in data_steps:
        b = runner.global_rows(s, rows)
        per = rows // grad_accum
        for j in range(grad_accum):
            yield runner.take_rows(b, slice(j * per, (j + 1) * per))


def test_loss_decreases_and_metrics_fields(tmp_path, dist):
    cfg = make_cfg(tmp_path, "dec", "train.steps=8", "data.batch_size=4", "tracking.progress=true")
    hist = Trainer(cfg, runner.tiny_model(), dist=dist).train(steps_stream(itertools.repeat(0)))
    losses = [m["loss"] for m in hist]
    assert losses[-1] < 0.7 * losses[0], losses
    lines = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(1, 9))
    for m in lines:
        assert set(METRIC_FIELDS) <= set(m), m
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0 and m["step_time_s"] > 0
        assert math.isfinite(m["grad_norm"]) and m["lr"] == pytest.approx(1e-2) and m["skipped"] is False
    assert "zero_stage" in (cfg.run_dir / "config.yaml").read_text()
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == "step_00000008"


def test_nan_stop_names_step_and_policy(tmp_path, dist):
    cfg = make_cfg(tmp_path, "stop", "train.steps=3", "data.batch_size=4")
    trainer = Trainer(cfg, runner.NaNModel.build(nan_call=2), dist=dist)
    with pytest.raises(FloatingPointError, match=r"step 2 .*train.nan_policy=stop"):
        trainer.train(steps_stream(range(3)))


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_nan_skip_drops_step_without_update(tmp_path, dist, zero):
    # grad_accum=2 and NaN in the 2nd micro-batch of step 2: the 1st micro-batch's gradient must be discarded too
    common = ["data.batch_size=2", "train.grad_accum=2", f"train.zero_stage={zero}"]
    skip = Trainer(make_cfg(tmp_path, f"skip{zero}", "train.steps=4", "train.nan_policy=skip", *common),
                   runner.NaNModel.build(nan_call=4), dist=dist)
    hist = skip.train(steps_stream(range(4), grad_accum=2))
    assert [m["skipped"] for m in hist] == [False, True, False, False]
    assert hist[1]["loss"] is None
    assert read_metrics(skip.cfg.run_dir / "metrics.jsonl")[1]["skipped"] is True
    # reference: the same run without step 2's data; a skipped step neither updates nor advances the schedule
    ref = Trainer(make_cfg(tmp_path, f"ref{zero}", "train.steps=3", *common), runner.tiny_model(), dist=dist)
    ref_hist = ref.train(steps_stream([0, 2, 3], grad_accum=2))
    got = [hist[0]["loss"], hist[2]["loss"], hist[3]["loss"]]
    assert got == pytest.approx([m["loss"] for m in ref_hist], rel=1e-6, abs=0)
    for (n, a), b in zip(skip.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, dist):
    overrides = ["train.steps=3", "train.save_every=1", "data.batch_size=4", "train.zero_stage=1"]
    full = Trainer(make_cfg(tmp_path, "full", *overrides), runner.tiny_model(), dist=dist).train(steps_stream(range(3)))

    cfg = make_cfg(tmp_path, "crash", *overrides)
    trainer = Trainer(cfg, runner.tiny_model(), dist=dist)
    real_save = trainer.engine.save_checkpoint
    calls = {"n": 0}

    def save_then_die(save_dir, tag, **kw):
        calls["n"] += 1
        real_save(save_dir, tag=tag, **kw)
        if calls["n"] == 2:  # step 2: DeepSpeed's files are written, ours are not, nothing is published
            raise KeyboardInterrupt("simulated kill during save")

    trainer.engine.save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        trainer.train(steps_stream(range(3)))
    ckpts = cfg.run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000001"
    assert (ckpts / "step_00000002.tmp").is_dir() and not (ckpts / "step_00000002").exists()

    resumed = Trainer(cfg, runner.tiny_model(seed=1), dist=dist)  # other init: weights must come from step 1
    hist = resumed.train(steps_stream(range(3)))
    assert not (ckpts / "step_00000002.tmp").exists()
    assert [m["loss"] for m in hist] == [m["loss"] for m in full]  # exact: same data position, same state
    assert [m["step"] for m in read_metrics(cfg.run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]  # keep_checkpoints=2


def test_bad_input_fails_before_step_one(tmp_path, dist):
    with pytest.raises(ConfigError, match=r"parallel.cp=2 needs a sequence-parallel group of 2 ranks"):
        Trainer(make_cfg(tmp_path, "cp", "parallel.cp=2"), runner.tiny_model(), dist=dist)
    with pytest.raises(ConfigError, match=r"train.offload_optimizer=true with train.zero_stage=3"):
        Trainer(make_cfg(tmp_path, "off", "train.zero_stage=3", "train.offload_optimizer=true"), runner.tiny_model(), dist=dist)
    with pytest.raises(ConfigError, match=r"train.trainable=feature_maps matches no parameter"):
        Trainer(make_cfg(tmp_path, "fm", "train.trainable=feature_maps"), runner.tiny_model(), dist=dist)
    # bf16 on a device without it: a CUDA device on this CPU-only torch (no GPU can run bf16 here)
    cuda = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"train.precision=bf16 .* use train.precision=fp32"):
        check_run(make_cfg(tmp_path, "bf", "train.precision=bf16"), dist=cuda, dp_size=1, sp_size=1, shard_fn_given=False)
    assert not (tmp_path / "cp").exists() and not (tmp_path / "off").exists()  # nothing ran


def test_trainable_attention_freezes_the_rest(tmp_path, dist):
    model = runner.tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(make_cfg(tmp_path, "att", "train.steps=1", "train.trainable=attention", "data.batch_size=4"),
            model, dist=dist).train(steps_stream(range(1)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".self_attn." in n), n


def test_lr_schedule_warmup_then_cosine():
    f = [lr_multiplier(i, warmup=4, total=14, min_ratio=0.1) for i in range(14)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_wandb_failure_does_not_stop(tmp_path, monkeypatch, caplog):
    import wandb

    from longreach.launch.config import TrackingConfig
    from longreach.launch.tracking import Tracker, resolve_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    assert resolve_mode(TrackingConfig(mode="auto")) == "offline"
    assert resolve_mode(TrackingConfig(wandb=False)) == "disabled"

    def boom(**kw):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    t = Tracker(TrackingConfig(mode="offline"), run_dir=tmp_path, name="x", config={})
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert t.run is None and "wandb.init(mode=offline) failed" in caplog.text
