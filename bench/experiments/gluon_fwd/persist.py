"""A/B in one process: the Gluon forward one CTA per work item vs persistent (gluon_sm90.PERSIST: one CTA per SM
walking a snake of the items), dense and S2, alternated for ROUNDS rounds; forward alone through
tk.attention_forward. PACKS=1,2,4: S2's q tile packing (default: the GQA group).
PYTHONPATH=. python bench/experiments/gluon_fwd/persist.py  ($OUT/gluon_fwd_persist.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench, forward_case, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_persist"))
hq, hkv = 32, 8
for S in [int(x) for x in os.environ.get("LENS", "8192,32768,131072").split(",")]:
    for s2 in [bool(int(x)) for x in os.environ.get("S2", "1,0").split(",")]:
        case = forward_case(S, s2, hq, hkv)
        packs = [int(x) for x in os.environ.get("PACKS", str(hq // hkv)).split(",")] if s2 else [1]

        ref = None
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            for pack in packs:
                for persist in (False, True):
                    g.OVERRIDE_PERSIST.update({False: persist, True: persist})
                    o, lse = case(pack)
                    ref = (o, lse) if ref is None else ref
                    rows.rec(S=S, s2=s2, pack=pack, persist=persist, round=rnd,
                             fwd_ms=bench(lambda: case(pack), rep=300 if S < 100000 else 100),
                             vs_first=max(rel(o, ref[0]), rel(lse, ref[1])), broken=list(g._BROKEN))
        g.OVERRIDE_PERSIST.clear()
        del case, ref, o, lse
        torch.cuda.empty_cache()
