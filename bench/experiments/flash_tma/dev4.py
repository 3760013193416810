"""Production backward with TMA descriptor loads (OVERRIDE bwd_tma) on vs off: dense and S2, 32K and 128K."""
import json, os, sys
import torch
from triton.testing import do_bench
sys.path.insert(0, os.path.dirname(__file__))
from harness import OUT, rel  # noqa: E402
from longreach.kernels.flash import triton as tk
from longreach.kernels.s2 import S2Pattern
from longreach.kernels.s2.triton import sparse_args
rows = []
hq, hkv, d = 32, 8, 128
pat = S2Pattern(128, 2048, 128, 8)
for S in (32768, 131072):
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    for sparse in (False, True):
        sp = sparse_args(pat, hkv, "cuda") if sparse else None
        pack = hq // hkv if sparse else 1
        out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=torch.bfloat16,
                                        sparse=sp, pack=pack)
        fl = 2.5 * 2.0 * S * S * hq * d * (pat.density(S, hkv) if sparse else 1.0)
        ref = None
        for tma in (False, True):
            tk.OVERRIDE.clear(); tk.OVERRIDE["bwd_tma"] = tma
            fn = lambda: tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=d ** -0.5,  # noqa: E731
                                               sparse=sp, pack=pack)
            g = fn(); torch.cuda.synchronize()
            if ref is None:
                ref = [x.clone() for x in g]
            ms = float(do_bench(fn, warmup=25, rep=300 if S == 32768 else 100, return_mode="median"))
            r = dict(S=S, sparse=sparse, tma=tma, bwd_ms=ms, tflops=fl / ms / 1e9,
                     diff_vs_pointer=[rel(a, b) for a, b in zip(g, ref)], stats={n: list(s) for n, s in tk.STATS.items()})
            rows.append(r); print(json.dumps(r), flush=True)
        tk.OVERRIDE.clear()
    del q, k, v, do, out, lse, ref, g
    torch.cuda.empty_cache()
json.dump(rows, open(f"{OUT}/bwd_tma_onoff.json", "w"), indent=1)
for r in rows:
    print(f"{r['S']:>7} {'s2' if r['sparse'] else 'dense':<6} tma={r['tma']!s:<5} {r['bwd_ms']:9.2f} ms {r['tflops']:5.0f} TF/s "
          f"diff {max(r['diff_vs_pointer']):.1e}")
