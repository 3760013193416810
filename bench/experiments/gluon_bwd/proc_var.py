"""Why ours' dense 128K forward+backward reads ~940 ms in some processes and ~1020 in others (fb_context, fb_peers,
fb_fa4import under ../gluon_fwd), while cuDNN and FA4 in the same processes move by ~1%: run this script in several
fresh processes one after another. Each times, through the bench's own _time_pair (reps 300, rounds alternated):
ours with the dense backward's q chunk (triton.FUSED_DQ_CHUNK_BYTES, one launch per chunk of q rows whose fp32 dq
fits; the first run of 2026-12-04 set FUSED_DQ_MAX_BYTES, the same thing then) at 2^27 / 2^28 / 2^29 bytes (CHUNKS;
MAX_BYTES: the one-launch limit), and cuDNN as the control; then a torch.profiler breakdown of one
forward+backward of the default, per kernel name, so a slow process shows which launch got slower.
PYTHONPATH=. PROC=0 python bench/experiments/gluon_bwd/proc_var.py  ($OUT/gluon_bwd_proc_var_<PROC>.json)"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.launch.bench import kernels as kb  # noqa: E402

PROC = os.environ.get("PROC", "0")
rows = Rows(f"gluon_bwd_proc_var_{PROC}")
S = int(os.environ.get("S", "131072"))
CHUNKS = [int(x) for x in os.environ.get("CHUNKS", "27,28,29").split(",")]
default = tk.FUSED_DQ_CHUNK_BYTES
keep = {"ours_flash", "sdpa_cudnn"}
m = kb._methods(S, 32, 8, 128, S2Pattern(), set())
m = {k: v for k, v in m.items() if k in keep}
q = m["ours_flash"][1][0]
rows.rec(proc=PROC, pid=os.getpid(), q_ptr=hex(q.data_ptr()), alloc=torch.cuda.memory_allocated() >> 20)

for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    for log2 in CHUNKS:
        tk.FUSED_DQ_CHUNK_BYTES = 1 << log2
        tk.FUSED_DQ_MAX_BYTES = int(os.environ.get("MAX_BYTES", 1 << 29))
        fwd, params, _ = m["ours_flash"]
        t = time.time()
        t_f, t_fb = kb._time_pair(fwd, params, 300)
        rows.rec(proc=PROC, t=round(t, 1), round=rnd, method="ours_flash", dq_chunk_log2=log2, fwd_ms=t_f,
                 fwdbwd_ms=t_fb)
    tk.FUSED_DQ_CHUNK_BYTES, tk.FUSED_DQ_MAX_BYTES = default, 1 << 29
    fwd, params, _ = m["sdpa_cudnn"]
    t = time.time()
    t_f, t_fb = kb._time_pair(fwd, params, 300)
    rows.rec(proc=PROC, t=round(t, 1), round=rnd, method="sdpa_cudnn", fwd_ms=t_f, fwdbwd_ms=t_fb)

fwd, params, _ = m["ours_flash"]
for p in params:
    p.requires_grad_(True)
dout = torch.randn_like(fwd())


def step():
    for p in params:
        p.grad = None
    fwd().backward(dout)


step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
kern = {}
for e in prof.key_averages():
    if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "self_device_time_total", 0):
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        kern[e.key[:80]] = (round(us / 2e3, 2), e.count // 2)
rows.rec(proc=PROC, profile_ms_per_step=dict(sorted(kern.items(), key=lambda kv: -kv[1][0])))
