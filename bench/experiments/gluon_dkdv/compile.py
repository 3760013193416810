"""Compile the Gluon dK/dV kernel (dkdv_ws.py) for sm_90a without a GPU: ptxas registers, spills, wgmma notes.
PYTHONPATH=. python bench/experiments/gluon_dkdv/compile.py [STAGES=4] [PINGPONG=0] [--sparse] [--acc] [--d64]"""
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
import dkdv_ws  # noqa: E402
from longreach.kernels.flash.triton import SparseArgs  # noqa: E402

for kv in sys.argv[1:]:
    if "=" in kv:
        n, x = kv.split("=")
        setattr(dkdv_ws, n, int(x))
t, hq, hkv, d = 1024, 32, 8, 64 if "--d64" in sys.argv else 128
q = torch.randn(t, hq, d, dtype=torch.bfloat16)
k = torch.randn(t, hkv, d, dtype=torch.bfloat16)
cu = torch.tensor([0, t], dtype=torch.int32)
delta = torch.zeros(hq, t)
sp = SparseArgs(128, 16, 1, 8, torch.zeros(hkv, dtype=torch.int32)) if "--sparse" in sys.argv else None
acc = "--acc" in sys.argv
dk, dv = (torch.zeros(t, hkv, d), torch.zeros(t, hkv, d)) if acc else (None, None)
dkdv_ws.dkdv(q, q, k, k, delta, delta, cu, cu, t, causal=True, scale=d ** -0.5, dk=dk, dv=dv, accumulate=acc,
             sparse=sp)
for name, kw, kern in ks.COMPILED:
    s = ks.stats(name, kern)
    print(s["notes"])
    print(name, {x: s[x] for x in ("regs", "spill_st", "spill_ld", "smem", "hgmma", "utmaldg", "ldl", "stl")})
    if "--sass" in sys.argv:
        open(f"/tmp/{name}.sass", "w").write(s["sass"])
