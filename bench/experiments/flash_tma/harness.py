"""Shared bits of the dev*.py experiment scripts: JSON rows under $OUT, median timing, relative error."""
import json
import os

import torch
from triton.testing import do_bench

OUT = os.environ.get("OUT", ".")


class Rows(list):
    """Results that print as they come and are rewritten to ``$OUT/<name>.json`` after each one."""

    def __init__(self, name: str):
        super().__init__()
        self.path = f"{OUT}/{name}.json"

    def rec(self, **r):
        self.append(r)
        print(json.dumps(r), flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)


def bench(fn, rep=300):
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def knob_variants(module, spec: str):
    """``spec`` = "K=1:J=0,K=0:J=0" (variants of a kernel module's integer constants, read at launch) -> (variant
    strings, use), ``use(variant)`` setting those constants on ``module`` (the ones a variant leaves out at their
    values from before; ``use(None)`` restores them all)."""
    variants = spec.split(",")
    parse = lambda v: {kv.split("=")[0]: int(kv.split("=")[1]) for kv in v.split(":")}  # noqa: E731
    defaults = {k: getattr(module, k) for k in sorted({k for v in variants for k in parse(v)})}

    def use(var):
        for k, x in {**defaults, **(parse(var) if var is not None else {})}.items():
            setattr(module, k, x)

    return variants, use


def check_variants(rows: Rows, variants, use, check, broken: list, worst: bool = False):
    """The sweeps' correctness pass: each variant set up (``use``), ``check()`` (a ``check_sm90_*`` of the kernels
    bench) run and recorded as one row (all ok?, its rows, the kernel module's launch errors ``broken``; ``worst``:
    also the largest ``*_vs_triton`` difference)."""
    for var in variants:
        use(var)
        chk = check()
        extra = {}
        if worst:
            extra["worst_vs_triton"] = max((v for r in chk for k, v in r.items()
                                            if isinstance(v, float) and k.endswith("_vs_triton")), default=None)
        rows.rec(check=var, ok=all(r.get("ok", True) for r in chk), **extra, rows=chk, broken=list(broken))


def forward_case(S: int, s2: bool, hq: int = 32, hkv: int = 8, d: int = 128):
    """The forward sweeps' case: random B1 causal bf16 q/k/v of S tokens (S2: block 128, window 2048, sink 128,
    stride 8) and a closure ``run(pack=None)`` -> (out, lse) through tk.attention_forward (the production dispatch;
    S2's pack defaults to the GQA group)."""
    from longreach.kernels.flash import triton as tk
    from longreach.kernels.s2 import S2Pattern
    from longreach.kernels.s2.triton import sparse_args

    torch.manual_seed(0)
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None

    def run(pack=None):
        pack = pack if pack is not None else (hq // hkv if s2 else 1)
        return tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype, sparse=sp,
                                    pack=pack)

    return run


def backward_case(S: int, s2: bool, hq: int = 32, hkv: int = 8, d: int = 128):
    """The backward sweeps' case: random B1 causal bf16 q/k/v/dout of S tokens (S2: block 128, window 2048, sink 128,
    stride 8, the group's q heads packed), their forward, and a closure that runs the backward alone through
    tk.attention_backward (the production dispatch) and returns (dq, dk, dv)."""
    from longreach.kernels.flash import triton as tk
    from longreach.kernels.s2 import S2Pattern
    from longreach.kernels.s2.triton import sparse_args

    torch.manual_seed(0)
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None
    pack = hq // hkv if s2 else 1
    out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype,
                                    sparse=sp, pack=pack)

    def run():
        return tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=d ** -0.5,
                                     sparse=sp, pack=pack)

    return run


def alternate(rows: Rows, run, variants, use, rounds: int, rep: int, broken: list, **key):
    """The sweeps' timing loop: ``rounds`` rounds of every variant in turn (``use(variant)`` sets it up), each
    variant's backward timed and its grads compared with the first variant's; rows keyed by ``key``, with ``broken``
    (the kernel module's launch errors)."""
    ref = None
    for rnd in range(rounds):
        for var in variants:
            use(var)
            g = run()
            ref = g if ref is None else ref
            rows.rec(**key, variant=var, round=rnd, bwd_ms=bench(run, rep=rep),
                     vs_first=[rel(a, b) for a, b in zip(g, ref)], broken=list(broken))
            del g
