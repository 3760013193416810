"""Compile the Gluon forward (fwd_ws.py) for sm_90a without a GPU and print ptxas's wgmma warnings and stats.
PYTHONPATH=. python bench/experiments/gluon_fwd/compile.py [--sparse] [--sass]"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "scripts"))
sys.path.insert(0, HERE)
import kernel_stats as ks  # noqa: E402
import torch  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_driver.set_active(ks._Sm90Driver())
JITFunction.run = ks._compile_only
import fwd_ws  # noqa: E402

for kv in sys.argv[1:]:
    if "=" in kv:
        n, x = kv.split("=")
        setattr(fwd_ws, n, int(x))
sparse = "--sparse" in sys.argv
t, hq, hkv, d = 1024, 32, 8, 128
q = torch.randn(t, hq, d, dtype=torch.bfloat16)
k = torch.randn(t, hkv, d, dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.tensor([0, t], dtype=torch.int32)
fwd_ws.attention_forward(q, k, v, cu, cu, t, causal=True, scale=d ** -0.5, sparse=object() if sparse else None,
                         dense_heads=torch.zeros(hkv, dtype=torch.int32),
                         sp=(128, 16, 1, 8) if sparse else (128, 1, 0, 1))
for name, kw, kern in ks.COMPILED:
    s = ks.stats(name, kern)
    print(s["notes"])
    print(name, {x: s[x] for x in ("regs", "spill_st", "spill_ld", "smem", "hgmma", "utmaldg", "ldl", "stl")})
    if "--sass" in sys.argv:
        open(f"/tmp/{name}.sass", "w").write(s["sass"])
        open(f"/tmp/{name}.ptx", "w").write(kern.asm["ptx"])
