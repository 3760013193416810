"""Follow-up of fb_peers.py (ours dense 128K fwd+bwd ~1020 ms in any process that had FlashAttention-4 built, even
before a peer ran, against ~940 ms without it, fb_context.py): is it importing FA4's CuTe DSL stack, building its
methods, or running it, and does it act on our compiled kernels (compile time) or on their run (run time)?
MODE=A: ours built and timed first, then each FA4 step in turn with ours timed after it (a run-time effect shows
up as ours slowing after one step). MODE=B: FA4 imported before ours is first compiled (with a fresh
TRITON_CACHE_DIR, so a compile-time effect shows up here and in the cubin hashes the script prints).
The bench's _time_pair (reps 300) throughout; environment changes and allocator counters are recorded.
PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:. MODE=A python .../fb_fa4import.py"""
import hashlib
import glob
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows  # noqa: E402
from longreach.kernels import flash_attention  # noqa: E402
from longreach.launch.bench import kernels as kb  # noqa: E402

MODE = os.environ.get("MODE", "A")
rows = Rows(f"gluon_fwd_fb_fa4import_{MODE}")
S, hq, hkv, d = int(os.environ.get("S", "131072")), 32, 8, 128
env0 = dict(os.environ)
q, k, v = kb._inputs(S, hq, hkv, d, "cuda")


def stats():
    m = torch.cuda.memory_stats()
    return {key: m.get(key) for key in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                        "reserved_bytes.all.current", "allocated_bytes.all.current")}


def timed(tag):
    for _ in range(2):
        t = time.time()
        t_f, t_fb = kb._time_pair(lambda: flash_attention(q, k, v, causal=True, return_lse=False), [q, k, v], 300)
        env = {key: val for key, val in os.environ.items() if env0.get(key) != val}
        rows.rec(t=round(t, 1), mode=MODE, tag=tag, fwd_ms=t_f, fwdbwd_ms=t_fb, env_changed=env, **stats())


def cubins():
    out = {}
    for p in glob.glob(os.path.join(os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"), "*", "*.cubin")):
        out[os.path.basename(p)] = hashlib.md5(open(p, "rb").read()).hexdigest()[:12]
    return out


def fa4_steps():
    t = time.time()
    import flash_attn.cute  # noqa: F401
    yield f"flash_attn.cute imported ({time.time() - t:.1f} s)"
    from longreach.launch.bench.fa4_peer import methods
    from longreach.kernels.s2 import S2Pattern
    from torch.nn.attention.flex_attention import create_block_mask
    pat = S2Pattern()
    bm = create_block_mask(pat.flex_mask_mod(hq // hkv), 1, hq, S, S, device="cuda", BLOCK_SIZE=pat.block,
                           _compile=True)
    m = methods(q, k, v, bm, pat.block, set())
    yield "fa4 methods built"
    for name in ("fa4", "fa4_s2"):
        kb._time_pair(m[name][0], m[name][1], 300)
        yield f"{name} ran"
    del m, bm
    torch.cuda.empty_cache()
    yield "fa4 methods dropped, cache emptied"


if MODE == "A":
    timed("fresh")
    for tag in fa4_steps():
        timed(tag)
else:
    steps = fa4_steps()
    first = next(steps)
    timed(f"{first}, ours compiled after")
    for tag in steps:
        timed(tag)
rows.rec(mode=MODE, cubins=cubins())
