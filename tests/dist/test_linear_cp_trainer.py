"""Hybrid models (softmax + 'linear' layers) under context parallelism in the trainer, end to end (torchrun, gloo):
the same tiny model (layer 0 'linear' with a hedgehog feature map and a 3-token softmax window, layer 1 softmax),
weights and global batches of packed documents (SEQ=37: every CP run pads, documents span chunks and ranks)
trained 3 steps give the per-step losses (1e-5, fp32), token counts and gradient norms of one process.

  reference  1 process   model.attention=dense, attention_layers {0: linear}, flat options   ZeRO-1
  2 ranks    ring cp=2   the same config ('dense' -> 'ring', flat options keyed to 'linear')  ZeRO-1
  2 ranks    ulysses cp=2 model.attention=linear, attention_layers {1: ulysses}, keyed options ZeRO-1, 2 micro-batches

Then the mapping and its errors (no processes), and the plan's linear chunk layout for every ring x ulysses split.
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
_spec = importlib.util.spec_from_file_location("linear_cp_trainer_runner", HERE / "linear_cp_trainer_runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

from longreach.errors import ConfigError  # noqa: E402
from longreach.launch.config import load_config  # noqa: E402
from longreach.launch.dist import free_port  # noqa: E402
from longreach.parallel.plan import ShardPlan  # noqa: E402
from longreach.parallel.setup import cp_model_config  # noqa: E402

LIN = {"feature_map": "hedgehog", "feature_dim": 8, "window": 3}
DENSE_LIN = {"attention_layers": {"0": "linear"}, "attention_options": LIN}  # flat options: the linear layer's
RUNS = {
    "ring2_z1": (["train.zero_stage=1", "data.batch_size=4", "parallel.cp=2"], DENSE_LIN, ["linear", "ring"]),
    "ulysses2_z1_accum": (["train.zero_stage=1", "data.batch_size=2", "train.grad_accum=2", "parallel.cp=2",
                           "parallel.strategy=ulysses", "parallel.ulysses=2"],
                          {"attention": "linear", "attention_layers": {"1": "ulysses"},
                           "attention_options": {"linear": LIN}}, ["linear", "ulysses"]),
}


def _env():
    # TRITON_INTERPRET=0: the linear layers run the plain-torch kernel, as CPU runs do outside tests (conftest turns
    # the Triton interpreter on; the kernel has its own tests and would cost minutes here)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", TRITON_INTERPRET="0")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _start(tmp_path: Path, name: str, runs: list, nproc: int) -> subprocess.Popen:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": runs}))
    launch = [sys.executable]  # one process: the runner initialises a world of one
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.Popen([*launch, str(HERE / "linear_cp_trainer_runner.py"), str(path)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_hybrid_linear_cp2_matches_one_process(tmp_path):
    # the reference runs in its own process as well: the kernel choice (TRITON_INTERPRET) is fixed at import
    two = _start(tmp_path, "cp2", [{"out": str(tmp_path), "name": n, "overrides": o, "model": m}
                                   for n, (o, m, _) in RUNS.items()], 2)
    one = _start(tmp_path, "ref", [{"out": str(tmp_path), "name": "ref", "model": DENSE_LIN,
                                    "overrides": ["train.zero_stage=1", "data.batch_size=4"]}], 1)
    for p in (one, two):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())["history"]

    assert len({m["tokens"] for m in ref}) == 3  # each step holds a different number of real tokens
    report = {}
    for name, (_, _, attention) in RUNS.items():
        got = json.loads((tmp_path / name / "result.json").read_text())
        hist = got["history"]
        assert got["attention"] == attention, name
        assert got["options"] == {"linear": LIN}, name  # flat options were keyed to 'linear' under CP
        assert [m["tokens"] for m in hist] == [m["tokens"] for m in ref], name
        loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(hist, ref))
        assert loss_diff <= 1e-5, f"{name}: losses {[m['loss'] for m in hist]} vs {[m['loss'] for m in ref]}"
        assert [m["grad_norm"] for m in hist] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-4), name
        report[name] = {"max_loss_diff": loss_diff, "losses": [m["loss"] for m in hist]}
    # training moved the weights: the losses are not three copies of the first
    assert len({round(m["loss"], 6) for m in ref}) == 3
    print(json.dumps(report, indent=1))


def _cfg(*overrides, **model):
    cfg = load_config(overrides=["tracking.wandb=false", "data.seq_len=64", "parallel.cp=2", *overrides])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_linear_mapping_and_errors():
    # 'linear' and per-layer mixes are taken as is; 'dense' becomes the strategy; flat options are keyed to 'linear'
    cfg = cp_model_config(_cfg(**DENSE_LIN))
    assert (cfg.model.attention, cfg.model.attention_layers, cfg.model.attention_options) == \
        ("ring", {"0": "linear"}, {"linear": LIN})
    assert cp_model_config(cfg) is cfg
    cfg = _cfg(attention="linear", attention_options={"linear": LIN})
    assert cp_model_config(cfg) is cfg
    one = _cfg("parallel.cp=1", **DENSE_LIN)
    assert cp_model_config(one) is one
    with pytest.raises(ConfigError, match=r"model.attention_layers=\{'1': 's2'\} under parallel.cp=2.*'ring' "
                                          r"\(softmax\) or 'linear'"):
        cp_model_config(_cfg(attention="linear", attention_layers={"1": "s2"}))
    with pytest.raises(ConfigError, match=r"model.attention_options=\{'ring': \{'window': 2\}\} under parallel.cp=2"):
        cp_model_config(_cfg(attention_layers={"0": "linear"}, attention_options={"ring": {"window": 2}}))
    # flat options would reach the softmax layer named explicitly
    with pytest.raises(ConfigError, match=r"would reach the context-parallel softmax attention 'ring'.*"
                                          r"model.attention_options=\{'linear'"):
        cp_model_config(_cfg(attention="linear", attention_layers={"1": "ring"}, attention_options=LIN))
    with pytest.raises(ConfigError, match=r"model.attention='flash' .*model.attention=linear"):
        cp_model_config(_cfg(attention="flash"))


@pytest.mark.parametrize("ring,uly", [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2), (3, 2), (2, 3)])
def test_plan_linear_chunks(ring, uly):
    """Every CP rank holds two whole linear chunks of S_pad / (2 cp) tokens, together a permutation of the row, in
    the order of its local tokens; the attention info carries them, the CP group and the document ids."""
    b, s = 2, 37
    cu = torch.tensor([0, 5, 37, 37 + 20, 74], dtype=torch.int32)
    plans = [ShardPlan(batch_size=b, seq_len=s, ring=ring, ulysses=uly, ring_rank=r, ulysses_rank=u, cu_seqlens=cu)
             for r in range(ring) for u in range(uly)]
    n, e = plans[0].num_linear_chunks, plans[0].padded_len // plans[0].num_linear_chunks
    assert n == 2 * ring * uly
    ids = [p.linear_chunk_ids() for p in plans]
    assert sorted(c for x in ids for c in x) == list(range(n)) and all(len(x) == 2 for x in ids)
    for p, x in zip(plans, ids):
        assert torch.equal(p.index(), torch.cat([torch.arange(c * e, (c + 1) * e) for c in x]))
    info = plans[-1].attn_info(strategy="ring", ring_group=None, ulysses_group=None, comm=None, group="cp")
    assert (info.group, info.chunk_ids, info.num_chunks, info.all_chunk_ids) == ("cp", ids[-1], n, tuple(ids))
    assert info.doc_ids.shape == (b, plans[0].padded_len)
    assert info.doc_ids[0, 4] != info.doc_ids[0, 5] and info.doc_ids[1, 19] != info.doc_ids[1, 20]


def test_linear_layer_refuses_a_plan_without_group():
    from longreach.attention.context import AttnContext
    from longreach.attention.registry import AttnSpec, build

    layer = build(AttnSpec("linear", 0, 2, 1, 4, {"window": 2}))
    info = ShardPlan(batch_size=1, seq_len=8, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0).attn_info(
        strategy="ring", ring_group=None, ulysses_group=None, comm=None)
    q = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match=r"needs ctx.parallel with \['group'\].*group=mesh.cp_group"):
        layer(q, q[:, :, :1], q[:, :, :1], ctx=AttnContext(parallel=info))
