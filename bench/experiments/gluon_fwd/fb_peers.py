"""Follow-up of fb_context.py (which found the bench's own _time_pair on ours at 128K as fast as fb_dense's loop,
928-947 ms, when no peer had run): what in a full `longreach bench kernels` run makes ours read ~1016 ms there.
One process, all methods built (FA4 too where it imports), the bench's _time_pair (reps 300) throughout:
  (a) ours at 128K fresh; (b) after ours (dense and S2) at 32K ran in the process; (c) ours after each peer in turn.
Each row has its wall-clock start (t) to read the clock off an nvidia-smi log beside it.
PYTHONPATH=. python bench/experiments/gluon_fwd/fb_peers.py"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.launch.bench import kernels as kb  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_fb_peers"))
S, hq, hkv, d = int(os.environ.get("S", "131072")), 32, 8, 128
skip = {"sdpa_flash"}


def timed(methods, name, tag, seqlen=S):
    fwd, params, _ = methods[name]
    t = time.time()
    t_f, t_fb = kb._time_pair(fwd, params, 300)
    rows.rec(t=round(t, 1), seqlen=seqlen, method=name, tag=tag, fwd_ms=t_f, fwdbwd_ms=t_fb)


big = kb._methods(S, hq, hkv, d, S2Pattern(), skip)
timed(big, "ours_flash", "fresh")
timed(big, "ours_flash", "fresh, again")
small = kb._methods(32768, hq, hkv, d, S2Pattern(), skip | {"flex", "flex_s2", "fa4", "fa4_s2", "sdpa_cudnn"})
timed(small, "ours_flash", "32K", 32768)
timed(small, "ours_s2", "32K", 32768)
del small
torch.cuda.empty_cache()
timed(big, "ours_flash", "after 32K ours")
for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    for peer in [n for n in big if not n.startswith("ours")]:
        timed(big, peer, f"peer, round {rnd}")
        timed(big, "ours_flash", f"after {peer}, round {rnd}")
    timed(big, "ours_s2", f"round {rnd}")
    timed(big, "ours_flash", f"after ours_s2, round {rnd}")
