"""The main job end to end through the CLI, on the embedded default cut to 2 layers (real GGUF, real text)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_cli_end_to_end(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "longreach.launch.cli", "demo", f"out_dir={tmp_path}", "name=d",
           "model.num_layers=2", "train.steps=2", "train.save_every=1", "data.seq_len=96",
           "eval.ppl_lengths=[32,64]", "eval.ppl_max_tokens=128", "eval.passkey_lengths=[80]",
           "eval.passkey_depths=[0.5]", "tracking.progress=false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "d"
    evals = json.loads((run / "evals.json").read_text())
    assert set(evals) == {"base", "scaled", "trained"}
    for label, res in evals.items():
        ppl = {r["length"]: r["ppl"] for r in res["perplexity"]}
        assert set(ppl) == {32, 64} and all(v > 1.0 for v in ppl.values()), (label, ppl)
        assert len(res["passkey"]) == 1 and 0.0 <= res["passkey"][0]["accuracy"] <= 1.0
    # RoPE scaling changes the model, so the scaled model scores differently from the base one
    assert evals["base"]["perplexity"][0]["ppl"] != evals["scaled"]["perplexity"][0]["ppl"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert "steps: 2" in (run / "config.yaml").read_text()
    assert (run / "perplexity.png").stat().st_size > 0 and (run / "passkey.png").stat().st_size > 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["max_position_embeddings"] == 16384
    # the printed tables carry the three columns
    assert "ppl base" in p.stdout and "ppl trained" in p.stdout


def test_demo_cli_bad_model_path(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "longreach.launch.cli", "demo", f"out_dir={tmp_path}", "model.path=/no/such/model"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "model.path" in p.stderr and "Traceback" not in p.stderr
