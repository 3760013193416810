"""``longreach bench kernels --linear``: our chunked linear-attention kernel vs flash-linear-attention's
``chunk_linear_attn`` vs cuDNN dense causal SDPA, and the full student layer (hedgehog feature maps +
fused window/linear hybrid kernel), forward and forward+backward, in one run on one GPU.

The student layer is the 'linear' module as the distillation recipe builds it: LoLCATs defaults, window 64,
hedgehog feature_dim 64 per KV head (128 features after [softmax(xW), softmax(-xW)]).

    python -m longreach.launch.bench.linear --seqlens 8192,32768,131072 --json out.json

Inputs are random bf16 [1, S, H, D] (fresh per size); times are the median of ``triton.testing.do_bench``.
``--check`` first compares our kernels with the fp64 references: the chunked kernel (fp32 inputs), the
student layer (fp32 and bf16, output and every gradient incl. the feature maps' parameters) against the
module's fp64 torch definition.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch


def _bench(fn: Callable, ms_budget: float) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(25, ms_budget / 4), rep=ms_budget, return_mode="median"))


def _fwd_bwd(f: Callable, inputs: list, do: torch.Tensor) -> Callable:
    def run():
        out = f()
        torch.autograd.grad(out, inputs, do)
    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(device: torch.device) -> dict:
    """Kernel vs the fp64 reference (fp32 inputs, GQA, unaligned length, states in/out, every gradient)."""
    from ...kernels.linear_attention import linear_attention_quadratic
    from ...kernels.linear_attention.triton import chunk_linear_attention

    torch.manual_seed(0)
    res = {}
    for (t, hq, hkv, kd, vd) in [(1000, 8, 2, 128, 128), (4096, 4, 4, 64, 128), (333, 4, 1, 273, 64)]:
        q = (torch.randn(2, t, hq, kd, device=device) * kd ** -0.5).requires_grad_()
        k = (torch.randn(2, t, hkv, kd, device=device) * kd ** -0.5).requires_grad_()
        v = torch.randn(2, t, hkv, vd, device=device).requires_grad_()
        h0 = torch.randn(2, hkv, kd, vd, device=device).requires_grad_()
        z0 = torch.randn(2, hkv, kd, device=device).requires_grad_()
        out = chunk_linear_attention(q, k, v, scale=0.3, initial_state=h0, initial_z=z0, with_den=True,
                                     output_final_state=True)
        ref = linear_attention_quadratic(*(x.double() for x in (q, k, v)), scale=0.3, initial_state=h0.double(),
                                         initial_z=z0.double(), with_den=True, output_final_state=True)
        ws = [torch.randn_like(x) for x in out]
        leaves = [q, k, v, h0, z0]
        loss = lambda o: sum((a.double() * w.double()).sum() for a, w in zip(o, ws))  # noqa: E731
        g = torch.autograd.grad(loss(out), leaves)
        gr = torch.autograd.grad(loss(ref), leaves)
        names = ["o", "den", "state", "z", "dq", "dk", "dv", "dh0", "dz0"]
        errs = [_rel(a, b) for a, b in zip(list(out) + list(g), list(ref) + list(gr))]
        res[f"T{t}_H{hq}/{hkv}_K{kd}_V{vd}"] = dict(zip(names, errs))
    res.update(check_bf16(device))
    res.update(check_student(device))
    return res


def check_bf16(device: torch.device) -> dict:
    """bf16 inputs: kernel (default forward config, and 64-token chunks) and fla vs fp64 on the same inputs."""
    import dataclasses

    from ...kernels.linear_attention import linear_attention_quadratic
    from ...kernels.linear_attention import triton as lt

    try:
        from fla.ops.linear_attn import chunk_linear_attn as fla
    except ImportError:
        fla = None
    torch.manual_seed(1)
    t, h, d = 4096, 4, 128
    q, k, v = ((torch.randn(1, t, h, d, device=device) * s_).bfloat16().requires_grad_()
               for s_ in (d ** -0.5, d ** -0.5, 1.0))
    do = torch.randn(1, t, h, d, device=device).bfloat16()
    ref = linear_attention_quadratic(*(x.double() for x in (q, k, v)), scale=0.5).o
    gref = torch.autograd.grad(ref, [q, k, v], do.double())
    fns = {}
    base = lt.FWD
    for name, cfg in (("default", base), ("bt64", dataclasses.replace(base, bt=64, h_bv=64, o_bk=128, o_bv=64))):
        fns[name] = (cfg, lambda: lt.chunk_linear_attention(q, k, v, scale=0.5).o)
    if fla is not None:
        fns["fla"] = (base, lambda: fla(q, k, v, scale=0.5, normalize=False)[0])
    res = {}
    for name, (cfg, fn) in fns.items():
        lt.FWD = cfg
        o = fn()
        g = torch.autograd.grad(o, [q, k, v], do)
        res[f"bf16_T{t}_{name}"] = {n: _rel(a, b) for n, a, b in zip(["o", "dq", "dk", "dv"], [o, *g], [ref, *gref])}
    lt.FWD = base
    return res


def check_student(device: torch.device) -> dict:
    """The 'linear' module on the kernels (fp32, bf16) vs its fp64 torch definition on the same device."""
    from ...attention.context import AttnContext
    from ...attention.registry import AttnSpec, build

    res = {}
    for (t, hq, hkv, w) in [(1000, 8, 2, 64), (777, 4, 4, 100)]:
        spec = AttnSpec("linear", 0, hq, hkv, 128, {"feature_map": "hedgehog", "window": w, "feature_dim": 64})
        m64 = build(spec).to(device).double()
        with torch.no_grad():
            for p in m64.parameters():
                p.add_(0.05 * torch.randn_like(p))
        x64 = [torch.randn(2, t, h, 128, device=device, dtype=torch.float64) for h in (hq, hkv, hkv)]
        xr = [x.clone().requires_grad_() for x in x64]
        ref = m64(*xr, ctx=AttnContext())
        wo = torch.randn_like(ref)
        gr = torch.autograd.grad((ref * wo).sum(), xr + list(m64.parameters()))
        for dt in (torch.float32, torch.bfloat16):
            m = build(spec).to(device)
            m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
            xk = [x.to(dt).requires_grad_() for x in x64]
            out = m(*xk, ctx=AttnContext())
            g = torch.autograd.grad((out.double() * wo).sum(), xk + list(m.parameters()))
            names = ["out", "dq", "dk", "dv"] + [f"d{n}" for n, _ in m.named_parameters()]
            res[f"student_T{t}_H{hq}/{hkv}_W{w}_{str(dt)[6:]}"] = {
                n: _rel(a, b) for n, a, b in zip(names, [out, *g], [ref, *gr])}
    return res


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="longreach bench kernels --linear", description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="8192,32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=32, help="key/value heads of the student layer")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=64, help="student layer's sliding-window width")
    ap.add_argument("--feature-dim", type=int, default=64, help="hedgehog projection width (features = 2x)")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    ap.add_argument("--no-dense", action="store_true", help="skip cuDNN dense SDPA")
    ap.add_argument("--no-torch-window", action="store_true", help="skip timing the old torch window path")
    ap.add_argument("--check", action="store_true", help="correctness checks before timing")
    ap.add_argument("--fwd-cfg", default=None,
                    help="JSON of kernels.linear_attention.triton.FwdCfg fields to use instead of the defaults "
                         "(the sweep's pick, longreach/launch/bench/linear_sweep.py)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels --linear needs a CUDA GPU")
    dev = torch.device("cuda")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ...attention.context import AttnContext
    from ...attention.registry import AttnSpec, build
    from ...kernels.linear_attention.triton import chunk_linear_attention

    import dataclasses

    from ...kernels.linear_attention import triton as lin_triton
    if args.fwd_cfg:
        lin_triton.FWD = lin_triton.FwdCfg(**json.loads(args.fwd_cfg))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": [],
              "fwd_cfg": dataclasses.asdict(lin_triton.FWD)}
    import triton
    result["triton"] = triton.__version__
    if args.check:
        result["check"] = check(dev)
        for name, errs in result["check"].items():
            print(name, " ".join(f"{k_}={v_:.2e}" for k_, v_ in errs.items()), flush=True)
    fla = None
    if not args.no_fla:
        try:
            from fla.ops.linear_attn import chunk_linear_attn as fla
        except ImportError as e:  # reported, not fatal: the rest of the table is still useful
            print(f"fla unavailable: {e}", flush=True)
    h, d = args.heads, args.head_dim
    scale = d ** -0.5
    for s in [int(x) for x in args.seqlens.split(",")]:
        torch.manual_seed(s)
        row = {"seqlen": s}
        budget = 400.0 if s <= 32768 else 1200.0
        q, k, v = (torch.randn(1, s, h, d, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        do = torch.randn(1, s, h, d, device=dev, dtype=torch.bfloat16)
        ours = lambda: chunk_linear_attention(q, k, v, scale=scale).o  # noqa: E731
        with torch.no_grad():
            row["ours_fwd_ms"] = _bench(ours, budget)
        row["ours_fwdbwd_ms"] = _bench(_fwd_bwd(ours, [q, k, v], do), budget)
        if fla is not None:
            fla_fn = lambda: fla(q, k, v, scale=scale, normalize=False)[0]  # noqa: E731
            with torch.no_grad():
                row["fla_fwd_ms"] = _bench(fla_fn, budget)
                row["ours_vs_fla_rel"] = _rel(ours(), fla_fn())
            row["fla_fwdbwd_ms"] = _bench(_fwd_bwd(fla_fn, [q, k, v], do), budget)
        if not args.no_dense:
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            dot = do.transpose(1, 2)

            def dense():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            with torch.no_grad():
                row["cudnn_fwd_ms"] = _bench(dense, budget)
            row["cudnn_fwdbwd_ms"] = _bench(_fwd_bwd(dense, [qt, kt, vt], dot), budget * 2)
        hkv = args.kv_heads
        layer = build(AttnSpec("linear", 0, h, hkv, d, {"feature_map": "hedgehog", "window": args.window,
                                                        "feature_dim": args.feature_dim})).to(dev)
        ks, vs = k.detach()[:, :, :hkv].clone().requires_grad_(), v.detach()[:, :, :hkv].clone().requires_grad_()
        ctx = AttnContext()
        student = lambda: layer(q, ks, vs, ctx=ctx)  # noqa: E731
        with torch.no_grad():
            row["student_fwd_ms"] = _bench(student, budget)
        row["student_fwdbwd_ms"] = _bench(_fwd_bwd(student, [q, ks, vs] + list(layer.parameters()), do), budget)
        # where the student's time goes (fwd+bwd of each piece alone), to aim the next optimisation
        from ...kernels.linear_attention.hybrid import window_softmax_torch
        from ...kernels.linear_attention.window import hybrid_window_linear
        fq, fk = (x.detach().requires_grad_() for x in (layer.feature_map_q(q), layer.feature_map_k(ks)))
        dsum = lambda f: (lambda: f().float().sum())  # noqa: E731
        one = torch.ones((), device=dev)
        row["part_feature_maps_fwdbwd_ms"] = _bench(
            _fwd_bwd(dsum(lambda: layer.feature_map_q(q).float().sum() + layer.feature_map_k(ks).float().sum()),
                     [q, ks] + list(layer.parameters()), one), budget)
        hyb = lambda: hybrid_window_linear(q, ks, vs, fq, fk, window=args.window, scale=scale, eps=1e-6)[0]  # noqa: E731
        with torch.no_grad():
            row["part_hybrid_kernel_fwd_ms"] = _bench(hyb, budget)
        row["part_hybrid_kernel_fwdbwd_ms"] = _bench(_fwd_bwd(hyb, [q, ks, vs, fq, fk], do), budget)
        row["part_linear_den_fwdbwd_ms"] = _bench(
            _fwd_bwd(dsum(lambda: chunk_linear_attention(fq, fk, vs, with_den=True).o.float().sum()),
                     [fq, fk, vs], one), budget)
        if not args.no_torch_window:  # the previous (torch, blocked) window path, for the record
            row["part_window_torch_fwdbwd_ms"] = _bench(
                _fwd_bwd(dsum(lambda: window_softmax_torch(q, ks, vs, window=args.window, scale=scale)[0].sum()),
                         [q, ks, vs], one), budget)
        del fq, fk
        if "fla_fwdbwd_ms" in row:
            row["ours_over_fla_fwd"] = row["ours_fwd_ms"] / row["fla_fwd_ms"]
            row["ours_over_fla_fwdbwd"] = row["ours_fwdbwd_ms"] / row["fla_fwdbwd_ms"]
            if s in (32768, 131072):  # issue 6's bar: at most fla's time, forward and forward+backward
                row["plain_meets_bar"] = max(row["ours_over_fla_fwd"], row["ours_over_fla_fwdbwd"]) <= 1.0
        if "cudnn_fwdbwd_ms" in row:
            row["cudnn_over_student_fwdbwd"] = row["cudnn_fwdbwd_ms"] / row["student_fwdbwd_ms"]
            bar = {32768: 6.0, 131072: 25.0}.get(s)  # issue 6's bar: student fwd+bwd this much faster than cuDNN
            if bar is not None:
                row["bar_cudnn_over_student"] = bar
                row["meets_bar"] = row["cudnn_over_student_fwdbwd"] >= bar
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do, layer
        torch.cuda.empty_cache()
    cols = ["seqlen", "ours_fwd_ms", "fla_fwd_ms", "cudnn_fwd_ms", "student_fwd_ms", "ours_fwdbwd_ms", "fla_fwdbwd_ms",
            "cudnn_fwdbwd_ms", "student_fwdbwd_ms", "ours_over_fla_fwd", "ours_over_fla_fwdbwd", "plain_meets_bar",
            "cudnn_over_student_fwdbwd",
            "part_feature_maps_fwdbwd_ms", "part_hybrid_kernel_fwdbwd_ms", "meets_bar"]
    print(" | ".join(cols))
    for r in result["rows"]:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
