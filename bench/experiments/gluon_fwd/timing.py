"""How the kernels bench's timing (triton do_bench: an L2 clear before each call, events around the call) compares
with back-to-back calls between two events and with the profiler's kernel time, for our kernels and Flex, dense and
S2 (B1 Hq32 Hkv8 D128 causal bf16, block 128 window 2048 sink 128 stride 8); and whether our path synchronises the
host (torch.cuda.set_sync_debug_mode). PYTHONPATH=. python bench/experiments/gluon_fwd/timing.py
(LENS=32768,131072 METHODS=ours_s2,flex_s2,ours_flash,flex; $OUT/timing.json)"""
import json
import os
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from longreach.kernels.s2 import S2Pattern
from longreach.launch.bench.kernels import _bench, _methods, train_step

OUT = os.environ.get("OUT", ".")
ALL = {"ours_flash", "ours_s2", "sdpa_cudnn", "sdpa_flash", "flex", "flex_s2", "fa4", "fa4_s2"}
want = os.environ.get("METHODS", "ours_s2,flex_s2,ours_flash,flex").split(",")
pattern = S2Pattern(128, 2048, 128, 8)
res = []


def events(fn, n):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def kernels(fn, n):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    t = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t[e.name[:60]] = t.get(e.name[:60], 0.0) + e.device_time / 1000 / n
    return sum(t.values()), sorted(t.items(), key=lambda x: -x[1])[:6]


for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    m = _methods(S, 32, 8, 128, pattern, ALL - set(want))
    n = 20 if S < 100000 else 4
    for rnd in range(2):
        for name in want:
            fwd, params, _ = m[name]
            step = train_step(fwd, params)

            def f():
                with torch.no_grad():
                    fwd()

            if rnd == 0 and name.startswith("ours"):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(1)
                    f()
                    step()
                    torch.cuda.set_sync_debug_mode(0)
                syncs = sorted({str(x.message)[:200] for x in w if "synchron" in str(x.message).lower()})
            else:
                syncs = None
            row = dict(S=S, method=name, round=rnd, syncs=syncs)
            for what, fn in (("fwd", f), ("fwdbwd", step)):
                fn()
                torch.cuda.synchronize()
                row[what + "_do_bench"] = _bench(fn, 300)
                row[what + "_events"] = events(fn, n)
                row[what + "_kernels"], row[what + "_top"] = kernels(fn, n)
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            res.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if not k.endswith("_top")}), flush=True)
            json.dump(res, open(f"{OUT}/timing.json", "w"), indent=1)
    del m
    torch.cuda.empty_cache()
