"""Held-out perplexity as a function of context length: the same text scored in non-overlapping windows of
each length, so a model that uses long context shows a perplexity that falls as the window grows."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn

from ...attention.context import AttnContext

logger = logging.getLogger(__name__)


def perplexity_by_length(model: nn.Module, tokens: torch.Tensor, lengths: Sequence[int], max_tokens: int, *,
                         device: torch.device | str, batch_size: int = 1) -> list[dict]:
    """Perplexity of ``model`` on the held-out stream ``tokens`` (int64 [T]) for each window length.

    For a length L, the first ``n = max(1, max_tokens // L)`` non-overlapping windows of the stream are scored
    (fewer if the stream is short), every window being one sequence with positions 0..L-1: inputs
    ``tokens[w*L : w*L+L]``, labels ``tokens[w*L+1 : w*L+L+1]``. Every length therefore reads the same text
    from the start of the stream, up to ``max_tokens`` tokens (one window when L > max_tokens). NLL is the mean
    over all scored tokens, ppl = exp(NLL). The model is put in eval mode (and restored) and run under
    ``torch.no_grad`` through ``model.loss_sum(input_ids, labels, position_ids, ctx)``.

    Returns ``[{"length", "ppl", "nll", "tokens", "windows"}]`` in the order of ``lengths``.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D held-out token stream, got shape {tuple(tokens.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    tokens = tokens.long()
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length in lengths:
                if length <= 0:
                    raise ValueError(f"eval.ppl_lengths value {length} must be > 0")
                windows = min(max(1, max_tokens // length), (tokens.numel() - 1) // length)
                if windows == 0:
                    raise ValueError(
                        f"the held-out text has {tokens.numel()} tokens, too few for one window of {length}+1; "
                        f"drop {length} from eval.ppl_lengths or raise data.heldout_fraction"
                    )
                nll_sum, count = 0.0, 0
                for w0 in range(0, windows, batch_size):
                    nb = min(batch_size, windows - w0)
                    span = tokens[w0 * length: (w0 + nb) * length + 1]
                    x = span[:-1].view(nb, length).to(device)  # [b, L]
                    y = span[1:].view(nb, length).to(device)  # [b, L]
                    pos = torch.arange(length, device=device).expand(nb, length)
                    loss, n = model.loss_sum(x, y, pos, AttnContext(causal=True))
                    nll_sum += float(loss)
                    count += int(n)
                nll = nll_sum / count
                results.append({"length": int(length), "ppl": math.exp(nll), "nll": nll, "tokens": count,
                                "windows": windows})
                logger.info("perplexity at length %d: %.3f (%d tokens)", length, results[-1]["ppl"], count)
    finally:
        model.train(was_training)
    return results
