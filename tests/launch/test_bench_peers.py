"""The optional FlashAttention-4 peer of ``longreach bench kernels`` and the agreement check every such peer passes
before it is timed (CPU: the peer itself needs a GPU and the flash-attn-4 package)."""
import sys

import torch

from longreach.launch.bench import fa4_peer
from longreach.launch.bench.kernels import agreement


def test_fa4_peer_absent_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    monkeypatch.setattr(fa4_peer, "_WHY", [])
    why = fa4_peer.available()
    assert why is not None and "flash_attn" in why
    x = torch.zeros(1, 8, 2, 64)
    assert fa4_peer.methods(x, x, x, None, 128, set()) == {}
    assert fa4_peer._WHY == [why]


def test_agreement_measures_out_and_grads():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = lambda: (q * k).tanh()  # noqa: E731
    same = agreement(ours, ours, [q, k])
    assert max(same.values()) == 0.0
    off = agreement(lambda: (q * k).tanh() * 1.01, ours, [q, k])  # 1% off: out and both grads
    assert abs(off["out"] - 0.01) < 1e-6 and abs(off["dq"] - 0.01) < 1e-6 and abs(off["dk"] - 0.01) < 1e-6
    other = agreement(lambda: (q + k).tanh(), ours, [q, k])  # another function: far off
    assert other["out"] > 0.1
