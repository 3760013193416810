"""One FlashAttention-4 forward (dense causal, B1 S=$S Hq32 Hkv8 D128 bf16) for Nsight Compute, to compare its
sm_90 kernel's instruction mix and stalls with ours (../gluon_fwd/ncu_fwd.sh). Run by ncu_fa4.sh."""
import os

import torch
from flash_attn.cute import flash_attn_func

S = int(os.environ.get("S", "32768"))
torch.manual_seed(0)
q = torch.randn(1, S, 32, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, S, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(2):  # (the first compiles; ncu -s 1 profiles the second)
    flash_attn_func(q, k, v, causal=True)
torch.cuda.synchronize()
