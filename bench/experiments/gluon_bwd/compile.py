"""Compile a Gluon sm_90 backward variant on a machine without a GPU (scripts/kernel_stats.py's stand-in driver) and
print ptxas's wgmma-serialization warning (C75xx) and registers / spills / shared memory / HGMMA count.
GB_VARIANT=ws PYTHONPATH=. python bench/experiments/gluon_bwd/compile.py [NAME=int ...] [--sparse] [--sass]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
import kernel_stats as ks  # noqa: E402
import torch  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_driver.set_active(ks._Sm90Driver())
JITFunction.run = ks._compile_only
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

gb = common.load(os.environ.get("GB_VARIANT", "ws"))

for kv in sys.argv[1:]:  # NAME=int overrides of the variant's module constants
    if "=" in kv:
        n, x = kv.split("=")
        setattr(gb, n, int(x))

sparse = "--sparse" in sys.argv
t, hq, hkv, d = 1024, 32, 8, 128
q = torch.randn(t, hq, d, dtype=torch.bfloat16)
k = torch.randn(t, hkv, d, dtype=torch.bfloat16)
v = torch.randn_like(k)
do = torch.randn_like(q)
out = torch.randn_like(q)
lse = torch.randn(hq, t)
cu = torch.tensor([0, t], dtype=torch.int32)
dq = torch.zeros(t, hq, d)
dk = torch.empty_like(k)
dv = torch.empty_like(v)
gb.attention_backward(do, q, k, v, out, lse, cu, cu, t, t, causal=True, scale=d ** -0.5, dq=dq, dk=dk, dv=dv,
                      accumulate=False, sparse=object() if sparse else None,
                      dense_heads=torch.zeros(hkv, dtype=torch.int32), sp=(128, 16, 1, 8) if sparse else (128, 1, 0, 1))
for name, kw, kern in ks.COMPILED:
    if name.startswith("_prep"):
        continue
    s = ks.stats(name, kern)
    print(s["notes"])
    print(name, {x: s[x] for x in ("regs", "spill_st", "spill_ld", "smem", "hgmma", "utmaldg", "ldl", "stl")})
    if "--sass" in sys.argv:
        open(f"/tmp/{name}.sass", "w").write(s["sass"])
        open(f"/tmp/{name}.ttgir", "w").write(kern.asm["ttgir"])
        open(f"/tmp/{name}.ptx", "w").write(kern.asm["ptx"])
