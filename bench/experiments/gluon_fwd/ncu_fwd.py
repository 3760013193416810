"""One Gluon sm_90 forward for Nsight Compute: S=$S tokens, S2=$S2 (0/1), B1 Hq32 Hkv8 D128 causal bf16, through
tk.attention_forward (the production dispatch; S2 packs the GQA group). Run by ncu_fwd.sh."""
import os

import torch

from longreach.kernels.flash import triton as tk
from longreach.kernels.s2 import S2Pattern
from longreach.kernels.s2.triton import sparse_args

S, s2 = int(os.environ.get("S", "32768")), os.environ.get("S2", "0") == "1"
hq, hkv, d = 32, 8, 128
torch.manual_seed(0)
q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None
for _ in range(2):  # (the first compiles; ncu -s 1 profiles the second)
    tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype, sparse=sp,
                         pack=hq // hkv if s2 else 1)
torch.cuda.synchronize()
