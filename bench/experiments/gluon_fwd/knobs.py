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
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402
from longreach.launch.bench.kernels import check_sm90_forward  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_knobs"))
VARIANTS = os.environ.get("VARIANTS", "STAGES=3,STAGES=2").split(",")
parse = lambda v: {kv.split("=")[0]: int(kv.split("=")[1]) for kv in v.split(":")}  # noqa: E731
knobs = sorted({k for v in VARIANTS for k in parse(v)})
defaults = {k: getattr(g, k) for k in knobs}


def use(var):
    for k, x in {**defaults, **parse(var)}.items():
        setattr(g, k, x)


for var in VARIANTS:
    use(var)
    chk = check_sm90_forward()
    rows.rec(check=var, ok=all(r.get("ok", True) for r in chk), rows=chk, broken=list(g._BROKEN))

hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    torch.manual_seed(0)
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    for kind in os.environ.get("KINDS", "dense,s2").split(","):
        sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if kind == "s2" else None

        def run():
            return tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype,
                                        sparse=sp, pack=hq // hkv if sp is not None else 1)

        ref = None
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            for var in VARIANTS:
                use(var)
                o, lse = run()
                ref = (o, lse) if ref is None else ref
                rows.rec(S=S, kind=kind, variant=var, round=rnd, fwd_ms=bench(run, rep=300 if S < 100000 else 1000),
                         vs_first=max(rel(o, ref[0]), rel(lse, ref[1])), broken=list(g._BROKEN))
                del o, lse
        use(VARIANTS[0])
    del q, k, v
    torch.cuda.empty_cache()
for k, x in defaults.items():
    setattr(g, k, x)
