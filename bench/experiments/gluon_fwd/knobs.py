"""Forward knobs of ``gluon_sm90`` (module constants read at launch), A/B in one process: each variant first runs
``check_sm90_forward`` (vs the Triton forward and fp32), then the forward alone through tk.attention_forward, B1 Hq32
Hkv8 D128 causal bf16, dense and S2 (block 128, window 2048, sink 128, stride 8, the GQA group packed), variants
alternated over ROUNDS; each variant's out/lse against the first's.
PYTHONPATH=. python bench/experiments/gluon_fwd/knobs.py
(VARIANTS="STAGES=3,STAGES=2" LENS=32768,131072 KINDS=dense,s2 ROUNDS=3; $OUT/gluon_fwd_knobs.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench, check_variants, forward_case, knob_variants, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g  # noqa: E402
from longreach.launch.bench.kernels import check_sm90_forward  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_knobs"))
VARIANTS, use = knob_variants(g, os.environ.get("VARIANTS", "STAGES=3,STAGES=2"))

check_variants(rows, VARIANTS, use, check_sm90_forward, g._BROKEN)

for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    for kind in os.environ.get("KINDS", "dense,s2").split(","):
        run = forward_case(S, kind == "s2")
        ref = None
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            for var in VARIANTS:
                use(var)
                o, lse = run()
                ref = (o, lse) if ref is None else ref
                rows.rec(S=S, kind=kind, variant=var, round=rnd, fwd_ms=bench(run, rep=300 if S < 100000 else 1000),
                         vs_first=max(rel(o, ref[0]), rel(lse, ref[1])), broken=list(g._BROKEN))
                del o, lse
        use(None)
        del run, ref
        torch.cuda.empty_cache()
