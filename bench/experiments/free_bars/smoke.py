"""FREE_BARS smoke test (run under `timeout`: a barrier count that does not add up hangs): forward and backward of a
small dense and S2 case with the PTX patch on and off, outputs / grads compared, and the patched PTX's per-step
bar.sync counts. PYTHONPATH=. python bench/experiments/free_bars/smoke.py"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import backward_case, forward_case, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g, gluon_sm90_bwd as gb  # noqa: E402

for S in (2048, 8192 + 100):
    for s2 in (False, True):
        res = {}
        for free in (0, 1):
            g.FREE_BARS = gb.FREE_BARS = free
            f = forward_case(S, s2)()
            b = backward_case(S, s2)()
            torch.cuda.synchronize()
            res[free] = (f, b)
        (f0, b0), (f1, b1) = res[0], res[1]
        print(S, "s2" if s2 else "dense", "fwd", [rel(a, c) for a, c in zip(f1, f0)], "bwd",
              [rel(a, c) for a, c in zip(b1, b0)], "broken", g._BROKEN, gb._BROKEN, flush=True)
