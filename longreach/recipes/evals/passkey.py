"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; the LongLoRA version of the prompt):
a 5-digit key hidden at a relative depth inside repeated filler text; the model must repeat it.

Decoding is greedy. To keep it cheap without a KV cache, each forward pass verifies a *draft* continuation
(the expected answer) the way speculative decoding does: the greedy token at every drafted position is read
from one forward, accepted while it matches the draft, and the first mismatch is itself the next greedy token.
The output is therefore exactly plain greedy decoding; a model that answers right needs one forward per trial.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...attention.context import AttnContext

logger = logging.getLogger(__name__)

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
_SENTENCES = [s.strip() + "." for s in FILLER.split(".") if s.strip()]


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class PasskeyPrompt:
    """One prompt: ``ids`` (no bos; as the data pipeline tokenizes) with the key line starting at token ``key_start``."""

    ids: list[int]
    key: str
    key_start: int
    """Token index where the key line starts (approximate by a token: measured on the tokenized prefix)."""
    depth: float


def _compose(n_sentences: int, depth: float, key: str) -> tuple[str, str]:
    """(text before the key line, whole prompt) with ``n_sentences`` filler sentences split at ``depth``."""
    before = round(depth * n_sentences)
    prefix = " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(before))
    suffix = " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(before, n_sentences))
    head = "\n".join(p for p in (TASK, prefix) if p) + "\n"
    return head, head + "\n".join(p for p in (key_line(key), suffix, QUESTION) if p)


def build_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The longest prompt of at most ``length`` tokens (filler added a sentence at a time, so it lands a few
    tokens under ``length``) with the key line at relative ``depth`` (0 = right after the task, 1 = right
    before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"eval.passkey_depths value {depth} must be in [0, 1]")
    count = lambda n: len(_ids(tokenizer, _compose(n, depth, key)[1]))  # noqa: E731
    if count(0) > length:
        raise ValueError(f"eval.passkey_lengths value {length} is shorter than the prompt without filler "
                         f"({count(0)} tokens); use lengths of at least {count(0) + 16}")
    lo, hi = 0, max(1, length)  # every filler sentence is at least one token: count(length) > length
    while lo < hi:  # largest n with count(n) <= length (count is non-decreasing in n)
        mid = (lo + hi + 1) // 2
        if count(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    head, text = _compose(lo, depth, key)
    return PasskeyPrompt(_ids(tokenizer, text), key, len(_ids(tokenizer, head)), depth)


def _logits_from(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [T - start, V] of a single sequence ids [T] at positions start.. (only those hit the lm head)."""
    x = ids[None]
    pos = torch.arange(x.shape[1], device=x.device)[None]
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        # our LlamaForCausalLM: skip [T, V] logits for the whole prompt (400 MB fp32 at 2k tokens, SmolLM2 vocab)
        return model.lm_head(model.hidden_states(x, pos, AttnContext(causal=True))[0, start:]).float()
    return model(x, pos, AttnContext(causal=True))[0, start:].float()


def greedy_decode(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *, device: torch.device | str,
                  draft: Sequence[int] = (), stop: Optional[Callable[[list[int]], bool]] = None) -> list[int]:
    """Exact greedy continuation of ``prompt`` (up to ``max_new_tokens`` tokens), full forward per call, with
    ``draft`` tokens verified in the same forward (see the module docstring). ``stop(tokens)`` ends early."""
    out: list[int] = []
    draft = list(draft)
    while len(out) < max_new_tokens:
        d = draft[: max_new_tokens - len(out) - 1]
        ids = torch.tensor(list(prompt) + out + d, dtype=torch.long, device=device)
        preds = _logits_from(model, ids, len(prompt) + len(out) - 1).argmax(-1).tolist()  # [len(d) + 1]
        accepted = []
        for j, p in enumerate(preds):
            accepted.append(p)
            if j >= len(d) or p != d[j]:
                break
        if len(accepted) > len(d):  # every drafted token matched; the extra one is the next greedy token
            rest = draft[len(d):]
            draft = rest[1:] if rest and rest[0] == accepted[-1] else []
        else:  # greedy left the draft: the rest of it is worthless
            draft = []
        out += accepted
        if stop is not None and stop(out):
            break
    return out[:max_new_tokens]


def _first_number(text: str) -> Optional[str]:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def passkey_trial(model: nn.Module, tokenizer: Any, prompt: PasskeyPrompt, *, device: torch.device | str,
                  max_new_tokens: int = 8) -> tuple[bool, str]:
    """(correct, decoded answer): correct when the first number in the greedy answer is the key."""
    decided = lambda toks: re.search(r"\d\D", tokenizer.decode(toks)) is not None  # noqa: E731  (number ended)
    out = greedy_decode(model, prompt.ids, max_new_tokens, device=device, draft=_ids(tokenizer, f" {prompt.key}."),
                        stop=decided)
    answer = tokenizer.decode(out)
    return _first_number(answer) == prompt.key, answer


def passkey_grid(model: nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int, device: torch.device | str, max_new_tokens: int = 8) -> list[dict]:
    """Accuracy of passkey retrieval for every (length, depth): ``trials`` random 5-digit keys each.

    Returns ``[{"length", "depth", "accuracy", "trials", "prompt_tokens", "answers"}]`` (length-major), where
    ``prompt_tokens`` is the mean real prompt length and ``answers`` the decoded greedy outputs.
    Keys depend only on ``seed`` and the cell, so two models see the same prompts.
    """
    if trials <= 0:
        raise ValueError(f"eval.passkey_trials={trials} must be > 0")
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length in lengths:
                for depth in depths:
                    rng = random.Random(f"passkey-{seed}-{length}-{depth}")
                    correct, answers, sizes = 0, [], []
                    for _ in range(trials):
                        prompt = build_prompt(tokenizer, length, depth, str(rng.randint(10000, 99999)))
                        ok, answer = passkey_trial(model, tokenizer, prompt, device=device,
                                                   max_new_tokens=max_new_tokens)
                        correct += ok
                        answers.append(answer)
                        sizes.append(len(prompt.ids))
                    results.append({"length": int(length), "depth": float(depth), "accuracy": correct / trials,
                                    "trials": trials, "prompt_tokens": sum(sizes) / trials, "answers": answers})
                    logger.info("passkey length %d depth %.2f: %d/%d", length, depth, correct, trials)
    finally:
        model.train(was_training)
    return results
