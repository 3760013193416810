"""Tile sweep for the flash / S2 Triton kernels (GPU only): times each kernel config at one length in one process.

``python -m longreach.launch.bench.flash_sweep --seqlen 32768 --json out.json --budget 380``
Checks the default tiles against an fp32 reference first (out, dq, dk, dv), then times the forward and the
backward (alone, given out/lse) of dense causal flash and S2 for each candidate tile, and writes flat JSON rows
(name, kernel, tile, ms, TFLOP/s, registers, spills). The results pick ``TILES``/``FUSED_BWD`` in
``kernels/flash/triton.py``; a variant that fails to compile or exceeds the time budget is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    from triton.testing import do_bench

    from ...kernels.flash import triton as tk
    from ...kernels.flash.reference import attention_reference
    from ...kernels.s2 import S2Pattern
    from ...kernels.s2.triton import sparse_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=380.0, help="seconds; later variants are skipped")
    ap.add_argument("--rep", type=int, default=150)
    ap.add_argument("--only", nargs="*", default=[], help="run only these sections")
    ap.add_argument("--json", default="flash_sweep.json")
    a = ap.parse_args(argv)
    t_start = time.time()
    rows: list = []

    def write():
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)

    s, hq, hkv, d = a.seqlen, a.heads, a.kv_heads, a.head_dim
    dev = "cuda"
    pat = S2Pattern(128, 2048, 128, 8)
    sp = sparse_args(pat, hkv, dev)
    dens = pat.density(s, hkv)
    flops_fwd = 2.0 * s * s * hq * d
    scale = d ** -0.5
    cu = torch.tensor([0, s], dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(s, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(s, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(s, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    do = torch.randn(s, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    rel = lambda x, y: ((x.double() - y.double()).norm() / y.double().norm()).item()  # noqa: E731

    def fwd(sparse, pack):
        return tk.attention_forward(q, k, v, cu, cu, s, causal=True, scale=scale, out_dtype=torch.bfloat16,
                                    sparse=sp if sparse else None, pack=pack)

    def check(tag, sparse, pack, n=2048):
        """Kernel vs fp32 reference at n tokens (fresh inputs, several documents), current tiles."""
        from ...kernels.s2 import s2_reference

        cu_c = torch.tensor([0, 700, 701, n], dtype=torch.int32, device=dev)
        qc, kc, vc = (torch.randn(n, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        dc = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
        o, l = tk.attention_forward(qc, kc, vc, cu_c, cu_c, n - 701, causal=True, scale=scale,
                                    out_dtype=torch.bfloat16, sparse=sp if sparse else None, pack=pack)
        gq, gk, gv = tk.attention_backward(dc, qc, kc, vc, o, l, cu_c, cu_c, n - 701, n - 701, causal=True,
                                           scale=scale, sparse=sp if sparse else None, pack=pack)
        qf, kf, vf = (x.float().requires_grad_() for x in (qc, kc, vc))
        if sparse:
            ro, rl = s2_reference(qf, kf, vf, cu_c, pattern=pat, scale=scale)
        else:
            ro, rl = attention_reference(qf, kf, vf, cu_c, cu_c, causal=True, scale=scale)
        ro.backward(dc.float())
        r = {"name": f"check_{tag}", "out": rel(o, ro), "lse": rel(l, rl), "dq": rel(gq, qf.grad),
             "dk": rel(gk, kf.grad), "dv": rel(gv, vf.grad)}
        r["ok"] = all(r[x] < 1e-2 for x in ("out", "dq", "dk", "dv")) and r["lse"] < 1e-4
        rows.append(r)
        print(r, flush=True)
        write()

    def timed(name, section, kernel, fn, flops, tiles: dict):
        if a.only and section not in a.only:
            return
        if time.time() - t_start > a.budget:
            rows.append({"name": name, "skipped": "budget"})
            return
        tk.OVERRIDE.clear()
        tk.OVERRIDE.update(tiles)
        t0 = time.time()
        try:
            fn()
            torch.cuda.synchronize()
            ms = float(do_bench(fn, warmup=30, rep=a.rep, return_mode="median"))
            err = None
        except Exception as e:  # noqa: BLE001 - a failing variant is a result
            ms, err = float("nan"), f"{type(e).__name__}: {str(e)[:300]}"
        row = {"name": name, "section": section, "ms": ms, "tflops": flops / ms / 1e9 if ms == ms else None,
               "stats": {kk: list(vv) for kk, vv in tk.STATS.items()}, "err": err, "wall": time.time() - t0,
               **{(kk if isinstance(kk, str) else f"{kk[0]}_{'s2' if kk[1] else 'dense'}"):
                  (vv if isinstance(vv, bool) else [vv.m, vv.n, vv.warps, vv.stages]) for kk, vv in tiles.items()}}
        rows.append(row)
        write()
        print(f"{name:<44} {ms:8.3f} ms {row['tflops'] or 0:6.0f} TF/s  {tk.STATS.get(kernel)}"
              + (f"  {err}" if err else ""), flush=True)
        tk.OVERRIDE.clear()

    T = tk.Tile
    tk.OVERRIDE.clear()
    out, lse = fwd(False, 1)
    out_s, lse_s = fwd(True, hq // hkv)

    def bwd(sparse, pack, o=out, l=lse):
        return tk.attention_backward(do, q, k, v, o, l, cu, cu, s, s, causal=True, scale=scale,
                                     sparse=sp if sparse else None, pack=pack)

    fb = 2.5 * flops_fwd
    fs = flops_fwd * dens
    g = hq // hkv
    # (name, section, kernel, sparse, overrides); every variant is also checked against fp32 at 2048 tokens
    at = lambda t: {"bwd_pack": True, "fused": False, "atomic_dq": True, ("dkdv_atomic", False): t}  # noqa: E731
    ats = lambda t: {"fused": False, "atomic_dq": True, ("dkdv_atomic", True): t}  # noqa: E731
    plan = [
        ("dense pack4 split", "bwd", "_attn_bwd_dkdv", False, {"bwd_pack": True, "fused": False}),
        ("dense atomic 64x128 w8 s2", "bwd", "_attn_bwd_dkdv", False, at(T(64, 128, 8, 2))),
        ("dense atomic 64x128 w8 s3", "bwd", "_attn_bwd_dkdv", False, at(T(64, 128, 8, 3))),
        ("dense atomic 32x128 w8 s2", "bwd", "_attn_bwd_dkdv", False, at(T(32, 128, 8, 2))),
        ("dense atomic 32x128 w4 s2", "bwd", "_attn_bwd_dkdv", False, at(T(32, 128, 4, 2))),
        ("dense atomic 64x64 w4 s2", "bwd", "_attn_bwd_dkdv", False, at(T(64, 64, 4, 2))),
        ("dense atomic 64x64 w4 s3", "bwd", "_attn_bwd_dkdv", False, at(T(64, 64, 4, 3))),
        ("dense atomic 128x128 w8 s2", "bwd", "_attn_bwd_dkdv", False, at(T(128, 128, 8, 2))),
        ("dense atomic 128x64 w8 s2", "bwd", "_attn_bwd_dkdv", False, at(T(128, 64, 8, 2))),
        ("s2 split", "s2bwd", "_attn_bwd_dkdv", True, {"fused": False}),
        ("s2 atomic 64x128 w8 s2", "s2bwd", "_attn_bwd_dkdv", True, ats(T(64, 128, 8, 2))),
        ("s2 atomic 32x128 w8 s2", "s2bwd", "_attn_bwd_dkdv", True, ats(T(32, 128, 8, 2))),
        ("s2 atomic 64x64 w4 s2", "s2bwd", "_attn_bwd_dkdv", True, ats(T(64, 64, 4, 2))),
        ("s2 atomic 128x128 w8 s2", "s2bwd", "_attn_bwd_dkdv", True, ats(T(128, 128, 8, 2))),
    ]
    for name, sec, kname, sparse, ov in plan:
        tk.OVERRIDE.clear()
        tk.OVERRIDE.update(ov)
        try:
            check(name, sparse, g if sparse else 1)
        except Exception as e:  # noqa: BLE001
            rows.append({"name": f"check_{name}", "ok": False, "err": f"{type(e).__name__}: {str(e)[:300]}"})
            print("check failed", name, e, flush=True)
        if sparse:
            timed(f"bwd {name}", sec, kname, lambda: bwd(True, g, out_s, lse_s), 2.5 * fs, ov)
        else:
            timed(f"bwd {name}", sec, kname, lambda: bwd(False, 1), fb, ov)
        rows[-1]["ok"] = bool(rows[-2].get("ok")) if len(rows) > 1 else False

    # ---- 128K: the best checked variants and the default forward tiles
    def best(sec):
        good = [r for r in rows if r.get("section") == sec and r.get("ok") and r.get("ms") == r.get("ms")]
        return min(good, key=lambda r: r["ms"]) if good else None

    picks = {sec: best(sec) for sec in ("bwd", "s2bwd")}
    print("picks", {k_: (v_ or {}).get("name") for k_, v_ in picks.items()}, flush=True)
    del q, k, v, do, out, lse, out_s, lse_s
    torch.cuda.empty_cache()
    s = 131072
    a.rep = 100
    flops_fwd = 2.0 * s * s * hq * d
    dens = pat.density(s, hkv)
    cu = torch.tensor([0, s], dtype=torch.int32, device=dev)
    q = torch.randn(s, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(s, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(s, hkv, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn(s, hq, d, device=dev, dtype=torch.bfloat16)
    timed("fwd dense 128K", "fwd128", "_attn_fwd", lambda: fwd(False, 1), flops_fwd, {})
    timed("fwd s2 128K", "s2fwd128", "_attn_fwd", lambda: fwd(True, g), flops_fwd * dens, {})
    out, lse = fwd(False, 1)
    out_s, lse_s = fwd(True, g)
    base_names = {"bwd": "bwd dense pack4 split", "s2bwd": "bwd s2 split"}
    for sec, sparse in (("bwd", False), ("s2bwd", True)):
        r = picks[sec]
        if r is None:
            continue
        for name in dict.fromkeys([r["name"], base_names[sec]]):  # the pick and the two-pass baseline
            ov = next(p_[4] for p_ in plan if f"bwd {p_[0]}" == name)
            if sparse:
                timed(f"{name} 128K", sec + "128", name, lambda: bwd(True, g, out_s, lse_s),
                      2.5 * flops_fwd * dens, ov)
            else:
                timed(f"{name} 128K", sec + "128", name, lambda: bwd(False, 1, out, lse), 2.5 * flops_fwd, ov)

    print("\nbest per section:")
    for sec in ("bwd", "s2bwd", "fwd128", "s2fwd128", "bwd128", "s2bwd128"):
        good = [r for r in rows if r.get("section") == sec and r.get("ms") == r.get("ms") and r.get("ms")]
        for r in sorted(good, key=lambda r: r["ms"])[:4]:
            print(f"  {r['name']:<60} {r['ms']:8.3f} ms {r['tflops']:6.0f} TF/s")
    print(f"total {time.time() - t_start:.0f} s")
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
