"""Per-kernel GPU time of one S2 forward+backward through s2_attention (block 128, window 2048, sink 128, stride 8;
B1 Hq32 Hkv8 D128 causal bf16), by torch.profiler: where the backward's time goes besides the dk/dv(+dq) kernel.
PYTHONPATH=. python bench/experiments/s2_bwd/profile.py  (LENS=32768,131072; $OUT/s2_profile.json)"""
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from longreach.kernels import s2_attention

OUT = os.environ.get("OUT", ".")
res = {}
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    torch.manual_seed(0)
    q = torch.randn(1, S, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, S, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn(1, S, 32, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out = s2_attention(q, k, v, block=128, window=2048, sink=128, stride=8, return_lse=False)
        out.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:90]] += e.device_time / 1000 / n
            cnt[e.name[:90]] += 1
    rows = sorted(((name, round(ms, 4), cnt[name] // n) for name, ms in tot.items()), key=lambda r: -r[1])
    res[S] = dict(total_ms=round(sum(tot.values()), 3), kernels=rows)
    print(S, "total", res[S]["total_ms"])
    for r in rows[:14]:
        print(f"  {r[1]:9.3f} ms  x{r[2]:<3} {r[0]}")
    del q, k, v, g
    torch.cuda.empty_cache()
json.dump(res, open(f"{OUT}/s2_profile.json", "w"), indent=1)
