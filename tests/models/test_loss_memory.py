"""``loss_sum``: chunked cross-entropy equals the plain full-logits loss (value and gradients), and under
autograd it keeps no logits for the backward (each chunk is recomputed), so the saved tensors stay far below
one [S, V] fp32 logits matrix."""

import torch
import torch.nn.functional as F

from longreach.models.llama import LlamaForCausalLM, ModelArgs


def _model():
    args = ModelArgs(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    return LlamaForCausalLM(args).init_weights(generator=torch.Generator().manual_seed(0))


def test_chunked_loss_equals_full_and_saves_no_logits():
    torch.manual_seed(0)
    m = _model()
    s = 300
    ids = torch.randint(0, 1000, (1, s))
    labels = torch.randint(0, 1000, (1, s))
    labels[0, :7] = -100

    def saved_bytes(chunk):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m.loss_sum(ids, labels, chunk=chunk)
        return out, sum(saved)

    (total, n), chunked = saved_bytes(64)
    _, whole = saved_bytes(4096)  # one chunk: no recompute, the logits are kept
    g = torch.autograd.grad(total, list(m.parameters()))
    logits_bytes = s * 1000 * 4
    assert whole - chunked >= logits_bytes, f"chunked loss saved {chunked} bytes, unchunked {whole}"
    ref = F.cross_entropy(m(ids).float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    gr = torch.autograd.grad(ref, list(m.parameters()))
    assert int(n) == s - 7
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
