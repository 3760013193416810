"""Compile the flash/S2 Triton kernels for an H100/H200 (sm_90a) on a machine WITHOUT a GPU and print each kernel's
registers, spills, shared memory and matrix instructions (ptxas -v + cuobjdump), at no device time.

    python scripts/kernel_stats.py [--sparse] [--docs] [--sass DIR] [--override 'fwd=128,128,8,3' ...]
    python scripts/kernel_stats.py --gluon [--json PATH]    # the Gluon sm_90 forward and dk/dv, 4 variants each
    (GLUON_SASS_DIR=DIR: also write each Gluon variant's SASS there, e.g. to find where spills are)

Triton compiles for an explicit target: a stand-in driver reports compute capability 9.0, every launch is turned
into a warm-up (compile only, no launch), and the drivers of ``longreach.kernels.flash.triton`` run unchanged on CPU
tensors. Needs the ``triton`` package (its bundled ptxas/cuobjdump) but no CUDA device. Must not run under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Sm90Driver(triton.backends.nvidia.driver.CudaDriver):  # type: ignore[attr-defined]
    def __init__(self):  # no CUDA utils: nothing is loaded or launched
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda idx=None: 0
        self.set_current_device = lambda idx: None

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list = []
_orig_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    k = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.fn.__name__, kwargs, k))
    return None


def _tools():
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas this Triton compiles with

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return get_ptxas(90).path, os.path.join(base, "cuobjdump")


def stats(name: str, k) -> dict:
    ptxas, cuobjdump = _tools()
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cub], capture_output=True, text=True).stdout
    if "Used" not in log:
        raise RuntimeError(f"ptxas gave no resource report for {name}:\n{log[-2000:]}")
    g = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return dict(kernel=name, regs=g(r"Used (\d+) registers"), spill_st=g(r"(\d+) bytes spill stores"),
                spill_ld=g(r"(\d+) bytes spill loads"), stack=g(r"(\d+) bytes stack frame"),
                smem=k.metadata.shared, hgmma=len(re.findall(r"\bHGMMA", sass)), hmma=len(re.findall(r"\bHMMA", sass)),
                ldgsts=len(re.findall(r"LDGSTS", sass)), utmaldg=len(re.findall(r"UTMALDG", sass)),
                ldl=len(re.findall(r"\bLDL", sass)), stl=len(re.findall(r"\bSTL", sass)), sass=sass,
                # ptxas's performance notes, e.g. C7514/C7515 (wgmma serialised), C7512 (out of registers)
                notes=[ln[ln.find("C75"):][:160] for ln in log.splitlines() if "C75" in ln])


# the Gluon forward's variants: (name, head dim, S2?, pack, accumulate, causal)
GLUON_VARIANTS = [("dense", 128, False, 1, False, True), ("s2_pack4", 128, True, 4, False, True),
                  ("d64_accumulate", 64, False, 1, True, True), ("noncausal_pack8", 128, False, 8, False, False)]


# the Gluon dk/dv kernel's variants: (name, head dim, S2?, accumulate, causal, dq added in by TMA reduce-add)
GLUON_BWD_VARIANTS = [("bwd_dense", 128, False, False, True, False), ("bwd_s2", 128, True, False, True, False),
                      ("bwd_d64_accumulate", 64, False, True, True, False),
                      ("bwd_noncausal", 128, False, False, False, False), ("bwd_dq_dense", 128, False, False, True, True),
                      ("bwd_dq_s2", 128, True, False, True, True), ("bwd_dq_d64_accumulate", 64, False, True, True, True),
                      ("bwd_dq_chunked", 128, False, True, True, True),  # (a long sequence's q chunk)
                      ("bwd_dq_s2_chunked", 128, True, True, True, True)]  # (S2's short q chunks)


def _compiled_stats(variant: str, module, launch) -> list[dict]:
    """``launch()`` (a Gluon host function, compile only) -> the stats of what it compiled (no SASS)."""
    COMPILED.clear()
    module._BROKEN.clear()
    launch()
    if module._BROKEN:
        raise RuntimeError(f"Gluon {variant} did not compile: {module._BROKEN[0]}")
    rows = []
    for kname, _, kern in COMPILED:
        st = stats(kname, kern)
        sass = st.pop("sass")
        if os.environ.get("GLUON_SASS_DIR"):  # (debugging: where the spills are)
            with open(os.path.join(os.environ["GLUON_SASS_DIR"], f"{variant}.sass"), "w") as f:
                f.write(sass)
        rows.append(dict(variant=variant, **st))
    return rows


def gluon_stats() -> list[dict]:
    """Compile kernels/flash/gluon_sm90.py's forward and gluon_sm90_bwd.py's dk/dv kernel for sm_90a in each
    variant -> their stats."""
    from longreach.kernels.flash import gluon_sm90 as g
    from longreach.kernels.flash import gluon_sm90_bwd as gb
    from longreach.kernels.flash.triton import SparseArgs, _sparse_args

    rows = []
    t, hq, hkv = 1024, 32, 8
    cu = torch.tensor([0, t], dtype=torch.int32)

    def inputs(d, sparse):
        q = torch.randn(t, hq, d, dtype=torch.bfloat16)
        k = torch.randn(t, hkv, d, dtype=torch.bfloat16)
        sp = SparseArgs(128, 16, 1, 8, torch.zeros(hkv, dtype=torch.int32)) if sparse else None
        return q, k, sp, *_sparse_args(sp, "cpu")

    for name, d, sparse, pack, acc, causal in GLUON_VARIANTS:
        q, k, sp, dense, spt = inputs(d, sparse)
        out = torch.zeros(t, hq, d, dtype=torch.float32 if acc else q.dtype)
        rows += _compiled_stats(name, g, lambda: g.attention_forward_into(
            q, k, k, out, torch.zeros(hq, t), cu, cu, t, dense, spt, causal=causal, scale=d ** -0.5,
            sparse=sp is not None, pack=pack, accumulate=acc))
    for name, d, sparse, acc, causal, fused_dq in GLUON_BWD_VARIANTS:
        q, k, sp, dense, spt = inputs(d, sparse)
        dk = torch.zeros(t, hkv, d, dtype=torch.float32 if acc else q.dtype)
        delta = torch.zeros(hq, t)
        rows += _compiled_stats(name, gb, lambda: gb.dkdv_into(
            q, q, k, k, delta, delta, cu, cu, t, dense, spt, dk, dk.clone(), causal=causal, scale=d ** -0.5,
            sparse=sp is not None, accumulate=acc,
            dq=torch.zeros(t, hq, d, dtype=torch.float32) if fused_dq else None,
            q_range=(256, 768) if name.endswith("chunked") else None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", action="store_true", help="S2 pattern (block 128, window 2048, sink 128, stride 8)")
    ap.add_argument("--docs", action="store_true", help="packed documents (varlen)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--override", nargs="*", default=[], help="kernel=m,n,warps,stages or flag=0/1 (OVERRIDE keys)")
    ap.add_argument("--sass", help="write each kernel's SASS into this folder")
    ap.add_argument("--no-tma", action="store_true", help="the backward's pointer-load path instead of TMA")
    ap.add_argument("--gluon", action="store_true", help="the Gluon sm_90 forward (kernels/flash/gluon_sm90.py)")
    ap.add_argument("--json", help="with --gluon: write the stats here")
    a = ap.parse_args(argv)
    _driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    if a.gluon:
        rows = gluon_stats()
        for r in rows:
            print(f"{r['variant']:<16} regs {r['regs']:>3} spill {r['spill_st']}/{r['spill_ld']} smem {r['smem']:>6} "
                  f"HGMMA {r['hgmma']:>3} TMA {r['utmaldg']:>3} notes {r['notes']}")
        if a.json:
            import json

            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    from longreach.kernels.flash import triton as tk

    # CPU tensors stand in for the GPU's: decide TMA as an sm_90 GPU would (descriptors over 16-byte aligned rows)
    tk._use_tma = lambda *xs: not a.no_tma  # noqa: E731

    for o in a.override:
        key, val = o.split("=")
        if "," in val:
            m, n, w, s = map(int, val.split(","))
            tk.OVERRIDE[(key, a.sparse)] = tk.Tile(m, n, w, s)
        else:
            tk.OVERRIDE[key] = bool(int(val))
    t, hq, hkv, d = 1024, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(t, hq, d, dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, 300, t] if a.docs else [0, t], dtype=torch.int32)
    sp = None
    if a.sparse:
        sp = tk.SparseArgs(block=128, window_blocks=16, sink_blocks=1, stride=8,
                           dense_heads=torch.zeros(hkv, dtype=torch.int32))
    pack = hq // hkv if a.sparse else 1
    out = torch.empty_like(q)
    lse = torch.empty(hq, t, dtype=torch.float32)
    tk.attention_forward(q, k, v, cu, cu, t, causal=True, scale=d ** -0.5, out_dtype=q.dtype, sparse=sp, pack=pack,
                         out=out, lse=lse)
    tk.attention_backward(torch.randn_like(q), q, k, v, out, lse, cu, cu, t, t, causal=True, scale=d ** -0.5,
                          sparse=sp, pack=pack)
    print(f"{'kernel':<18} {'tiles':<50} {'regs':>4} {'spill st/ld':>12} {'stack':>5} {'smem':>6} "
          f"{'HGMMA':>5} {'HMMA':>4} {'TMA':>4} {'LDL/STL':>8}")
    for name, kw, k in COMPILED:
        if name == "_bwd_delta":
            continue
        s = stats(name, k)
        tiles = ",".join(f"{x}={kw[x]}" for x in kw if x.startswith("BLOCK") or x in ("num_warps", "num_stages"))
        print(f"{name:<18} {tiles:<50} {s['regs']:>4} {s['spill_st']:>5}/{s['spill_ld']:<6} {s['stack']:>5} "
              f"{s['smem']:>6} {s['hgmma']:>5} {s['hmma']:>4} {s['utmaldg']:>4} {s['ldl']:>3}/{s['stl']:<4}")
        if a.sass:
            os.makedirs(a.sass, exist_ok=True)
            with open(os.path.join(a.sass, f"{name}.sass"), "w") as f:
                f.write(s["sass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
