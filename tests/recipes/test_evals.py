"""Evals: perplexity by length against an fp64 hand computation, passkey prompts and scoring (exact greedy
decoding, oracle and wrong stub models), and the report files."""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from longreach.models.llama import LlamaForCausalLM, ModelArgs
from longreach.recipes.evals.passkey import (FILLER, QUESTION, TASK, _SENTENCES, build_prompt, greedy_decode,
                                             key_line, passkey_grid)
from longreach.recipes.evals.perplexity import perplexity_by_length
from longreach.recipes.evals.report import compare_tables, write_report

VOCAB = 128


class CharTokenizer:
    """ASCII code points as ids (0 = eos): the tokenizer interface the evals use."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) if 0 < ord(c) < VOCAB else ord("?") for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 0)


def tiny_model(seed=0):
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForCausalLM(args).init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- perplexity
def reference_ppl(model, tokens, length, max_tokens):
    """fp64: plain logits + F.cross_entropy over the same non-overlapping windows."""
    m = copy.deepcopy(model).double().eval()
    windows = min(max(1, max_tokens // length), (tokens.numel() - 1) // length)
    nlls = []
    with torch.no_grad():
        for w in range(windows):
            x = tokens[w * length: (w + 1) * length][None]
            y = tokens[w * length + 1: (w + 1) * length + 1]
            nlls.append(F.cross_entropy(m(x)[0], y, reduction="none"))
    nll = torch.cat(nlls).mean().item()
    return math.exp(nll), windows * length


def test_perplexity_matches_hand_computation():
    model = tiny_model()
    model.train()
    tokens = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))
    lengths = [16, 48, 100, 200]
    rows = perplexity_by_length(model, tokens, lengths, max_tokens=96, device="cpu")
    assert model.training  # mode restored
    assert [r["length"] for r in rows] == lengths
    for r in rows:
        ppl, count = reference_ppl(model, tokens, r["length"], 96)
        assert r["tokens"] == count
        assert r["ppl"] == pytest.approx(ppl, rel=1e-5), r
        assert r["nll"] == pytest.approx(math.log(ppl), rel=1e-5)
    assert rows[0]["tokens"] == 96 and rows[2]["tokens"] == 100 and rows[3]["tokens"] == 200  # one window when L > max
    batched = perplexity_by_length(model, tokens, lengths, max_tokens=96, device="cpu", batch_size=4)
    for a, b in zip(rows, batched):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)


def test_perplexity_too_short_text_names_the_fix():
    with pytest.raises(ValueError, match="eval.ppl_lengths"):
        perplexity_by_length(tiny_model(), torch.arange(50), [64], 128, device="cpu")


# ------------------------------------------------------------------------------------------------ passkey
@pytest.mark.parametrize("length", [300, 700, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_and_depth(length, depth):
    tok = CharTokenizer()
    p = build_prompt(tok, length, depth, "71432")
    longest_sentence = max(len(s) for s in _SENTENCES) + 1
    assert length - longest_sentence <= len(p.ids) <= length
    text = tok.decode(p.ids)
    assert text.startswith(TASK) and text.endswith(QUESTION)
    assert tok.decode(p.ids[p.key_start:]).startswith(key_line("71432"))
    # relative depth of the key inside the filler, within one filler sentence
    before, after = text.split(key_line("71432"))
    filler_before = len(before) - len(TASK)
    filler_after = len(after) - len(QUESTION)
    assert abs(filler_before / (filler_before + filler_after) - depth) <= longest_sentence / (filler_before + filler_after)
    assert FILLER.split(".")[0] in text


def test_prompt_too_short_names_the_field():
    with pytest.raises(ValueError, match="eval.passkey_lengths"):
        build_prompt(CharTokenizer(), 100, 0.5, "12345")


class AnswerStub(nn.Module):
    """Fake LM: logits peaked on the characters of ' <answer>.' right after the question, where answer is
    the real pass key found in the prompt (oracle) or a fixed wrong number."""

    def __init__(self, wrong=None):
        super().__init__()
        self.wrong, self.forwards = wrong, 0

    def forward(self, input_ids, position_ids=None, ctx=None):
        self.forwards += 1
        text = "".join(chr(i) for i in input_ids[0].tolist())
        key = self.wrong or re.search(r"The pass key is (\d+)\. Remember", text).group(1)
        answer = f" {key}. Good."
        start = text.rindex(QUESTION) + len(QUESTION) - 1  # position whose next token is the answer's first
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for t in range(start, input_ids.shape[1]):
            logits[0, t, ord(answer[min(t - start, len(answer) - 1)])] = 10.0
        return logits


def test_passkey_grid_oracle_and_wrong_model():
    tok = CharTokenizer()
    oracle = AnswerStub()
    rows = passkey_grid(oracle, tok, [300, 600], [0.0, 0.5, 1.0], trials=3, seed=0, device="cpu")
    assert [(r["length"], r["depth"]) for r in rows] == [(n, d) for n in (300, 600) for d in (0.0, 0.5, 1.0)]
    assert all(r["accuracy"] == 1.0 and r["trials"] == 3 for r in rows)
    assert all(re.match(r" \d{5}\.", a) for r in rows for a in r["answers"])
    assert oracle.forwards == 6 * 3  # the draft is verified in one forward per trial
    wrong = AnswerStub(wrong="00000")
    rows = passkey_grid(wrong, tok, [300, 600], [0.0, 0.5, 1.0], trials=3, seed=0, device="cpu")
    assert all(r["accuracy"] == 0.0 for r in rows)
    assert all(a.startswith(" 00000.") for r in rows for a in r["answers"])
    # keys depend only on the seed and the cell
    a = passkey_grid(AnswerStub(), tok, [300], [0.5], trials=2, seed=7, device="cpu")
    b = passkey_grid(AnswerStub(), tok, [300], [0.5], trials=2, seed=7, device="cpu")
    assert a == b


def test_greedy_decode_with_draft_equals_plain_greedy():
    model = tiny_model(seed=3).eval()
    prompt = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    # plain greedy: one full forward per token
    ref = []
    with torch.no_grad():
        for _ in range(8):
            ref.append(int(model(torch.tensor([prompt + ref]))[0, -1].argmax()))
        for draft in ([], ref[:3] + [(ref[3] + 1) % VOCAB, 5, 6], ref, ref[:5], [(ref[0] + 1) % VOCAB] * 8):
            assert greedy_decode(model, prompt, 8, device="cpu", draft=draft) == ref, draft


# ------------------------------------------------------------------------------------------------- report
def test_report_files_and_comparison(tmp_path):
    before = {"perplexity": [{"length": 512, "ppl": 20.0, "nll": math.log(20.0), "tokens": 8192},
                             {"length": 1024, "ppl": 45.0, "nll": math.log(45.0), "tokens": 8192}],
              "passkey": [{"length": 512, "depth": d, "accuracy": 1.0, "trials": 2} for d in (0.0, 1.0)]
              + [{"length": 1024, "depth": d, "accuracy": 0.0, "trials": 2} for d in (0.0, 1.0)]}
    after = {"perplexity": [{"length": 512, "ppl": 19.0, "nll": math.log(19.0), "tokens": 8192},
                            {"length": 1024, "ppl": 17.5, "nll": math.log(17.5), "tokens": 8192}],
             "passkey": [{"length": n, "depth": d, "accuracy": 0.5, "trials": 2} for n in (512, 1024) for d in (0.0, 1.0)]}
    paths = write_report(tmp_path / "evals", {"before": before, "after": after})
    assert set(paths) == {"json", "perplexity_png", "passkey_png"}
    assert json.loads(paths["json"].read_text())["after"]["perplexity"][1]["ppl"] == 17.5
    for key in ("perplexity_png", "passkey_png"):
        data = paths[key].read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=120)
    tables = compare_tables(before, after, console=console)
    out = console.export_text()
    assert len(tables) == 2
    assert "ppl before" in out and "ppl after" in out and "45.000" in out and "17.500" in out
    assert "-61.1%" in out  # (17.5 - 45) / 45
    assert "0.50 (1/2)" in out and "1.00 (2/2)" in out
