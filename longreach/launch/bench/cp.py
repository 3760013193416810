"""``longreach bench cp``: the context-parallel attention op, forward+backward, for each strategy.

Run on the world size it is launched with (``torchrun --nproc_per_node N -m longreach.launch.bench.cp``, or
``--ranks N`` to have it call torchrun itself; plain ``python`` is one rank). Causal attention over a global
sequence of ``tokens_per_rank * world`` tokens, batch ``--batch``.

Reported per strategy (table on rank 0 + JSON):
* fwd ms, fwd+bwd ms: time per call, max over ranks (the slowest rank sets the step time);
* TFLOP/s per rank: causal fwd FLOPs ``2 * B * S^2 * Hq * D`` (half of the dense 4*S^2*H*D), fwd+bwd 3.5x that,
  divided by the world size and by the fwd+bwd time;
* efficiency: that throughput over the single-device kernel's on the same per-rank work, timed concurrently on
  every rank so both see the same machine load. The kernel is our Triton flash attention (bf16 on GPU; on CPU the
  local block function). One document per row: causal attention at ``S / sqrt(world)`` tokens (the same causal
  FLOPs as one rank's share). Packed documents (``--docs longtail``): the whole packed row on one device, so
  efficiency = t_single / (world * t_cp), FLOPs counted per document;
* peak memory: CUDA max allocated per rank (max over ranks); on CPU the process peak RSS (monotone over the run,
  so a coarse upper bound);
* max err: forward error of this rank's output against a dense single-process reference (catches a peer that
  silently computes something else).

Peers timed in the same run when importable: PyTorch's native context parallel
(``torch.distributed.tensor.experimental.context_parallel`` around SDPA) and yunchang's ``LongContextAttention``
with its torch backend; a peer that cannot run reports why instead of a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="longreach bench cp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-rank", type=int, default=4096 if gpu else 256, help="sequence tokens per rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64 if gpu else 32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32")
    p.add_argument("--iters", type=int, default=10 if gpu else 3)
    p.add_argument("--warmup", type=int, default=3 if gpu else 1)
    p.add_argument("--strategies", default="ring,ulysses,hybrid", help="comma-separated subset of ring,ulysses,hybrid")
    p.add_argument("--ulysses", type=int, default=0, help="Ulysses degree of the hybrid strategy (0: 2 when it splits)")
    p.add_argument("--docs", choices=("none", "longtail"), default="none",
                   help="longtail: pack each row with documents of long-tailed lengths (log-normal, none over a "
                        "quarter of the row), attention within documents only")
    p.add_argument("--layout", choices=("per_doc", "global"), default="per_doc",
                   help="shard layout for packed documents (the trainer's choice for softmax models: per_doc)")
    p.add_argument("--no-peers", action="store_true", help="skip torch native CP and yunchang")
    p.add_argument("--out", default="", help="JSON output path (default bench/results/cp_<world>ranks_<device>.json)")
    p.add_argument("--ranks", type=int, default=0, help="launch this many ranks with torchrun (when not already under it)")
    return p


# --------------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], *, iters: int, warmup: int, device: torch.device) -> float:
    """Mean ms per call on this rank, then max over ranks (a collective: every rank must call it)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    ms = torch.tensor([(time.perf_counter() - t0) * 1e3 / iters], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        v = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = torch.tensor([v], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def causal_flops_fwd_bwd(b: int, s: int, hq: int, d: int) -> float:
    """Causal attention forward (2*B*S^2*H*D: half of the dense 4*B*S^2*H*D) plus backward (2.5x forward)."""
    return 3.5 * 2.0 * b * s * s * hq * d


def longtail_cu_seqlens(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """int32 [n_docs+1] over b rows of s tokens: log-normal document lengths (median s/64, long tail), each capped
    at a quarter of the row; every row starts a document. Same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    cap, cuts = max(1, s // 4), [0]
    for row in range(b):
        at = 0
        while at < s:
            n = int(torch.exp(torch.randn((), generator=g) * 1.2 + math.log(max(2.0, s / 64))).clamp(1, cap))
            n = min(n, s - at)
            at += n
            cuts.append(row * s + at)
    return torch.tensor(cuts, dtype=torch.int32)


def doc_flops_fwd_bwd(cu: torch.Tensor, hq: int, d: int) -> float:
    """Causal attention FLOPs within documents (forward + backward), summed over the documents."""
    lens = (cu[1:] - cu[:-1]).double()
    return float(3.5 * 2.0 * (lens * lens).sum() * hq * d)


# ------------------------------------------------------------------------------------------------------ the cases
class Case:
    """Global inputs (same on every rank) and a dense reference output."""

    def __init__(self, a, device: torch.device, dtype: torch.dtype):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.b, self.hq, self.hkv, self.d = a.batch, a.heads, a.kv_heads, a.head_dim
        self.s = a.tokens_per_rank * self.world
        self.device, self.dtype = device, dtype
        self.cu = longtail_cu_seqlens(self.b, self.s) if getattr(a, "docs", "none") == "longtail" else None
        self.layout = getattr(a, "layout", "per_doc")
        g = torch.Generator().manual_seed(0)
        mk = lambda h: torch.randn(self.b, self.s, h, self.d, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v, self.dout = mk(self.hq), mk(self.hkv), mk(self.hkv), mk(self.hq)
        with torch.no_grad():
            qt, kt, vt = (x.transpose(1, 2).float() for x in (self.q, self.k, self.v))
            if self.cu is None:
                self.ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
            else:  # per document (the rows are flattened: documents never cross rows)
                flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).transpose(0, 1)  # noqa: E731
                qf, kf, vf = flat(qt), flat(kt), flat(vt)  # [H, B*S, D]
                outs = []
                for a_, e_ in zip(self.cu[:-1].tolist(), self.cu[1:].tolist()):
                    outs.append(F.scaled_dot_product_attention(qf[None, :, a_:e_], kf[None, :, a_:e_],
                                                               vf[None, :, a_:e_], is_causal=True,
                                                               enable_gqa=True)[0])
                self.ref = torch.cat(outs, 1).transpose(0, 1).reshape(self.b, self.s, self.hq, self.d)


def _ours(case: Case, strategy: str, uly: int, comm):
    from ...parallel.hybrid import cp_attention
    from ...parallel.mesh import build_mesh
    from ...parallel.plan import ShardPlan
    from ...parallel.ulysses import check_heads

    w = case.world
    mesh = build_mesh(cp=w, ulysses=uly, strategy=strategy)
    check_heads(num_heads=case.hq, num_kv_heads=case.hkv, ulysses=mesh.ulysses)
    plan = ShardPlan(batch_size=case.b, seq_len=case.s, ring=mesh.ring, ulysses=mesh.ulysses, ring_rank=mesh.ring_rank,
                     ulysses_rank=mesh.ulysses_rank, cu_seqlens=case.cu, layout=case.layout)
    info = plan.attn_info(strategy=strategy, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, comm=comm)
    q, k, v = (plan.shard(x).requires_grad_() for x in (case.q, case.k, case.v))
    dout = plan.shard(case.dout)
    fwd = lambda: cp_attention(q, k, v, info=info, causal=True)
    real = plan.token_index() < case.s  # [B, S_local]: pad tokens are not in the reference
    with torch.no_grad():
        err = float((fwd().float() - plan.shard(case.ref))[real].abs().max())
    return fwd, dout, (q, k, v), err, f"ring={mesh.ring} ulysses={mesh.ulysses}"


def _single_device(case: Case, s_eq: int):
    """The kernel alone (no communication) on ``s_eq`` tokens (the whole packed row with --docs): the efficiency
    baseline. Our Triton flash attention where it runs (bf16 on GPU), else the local block function."""
    from ...kernels.flash import flash_attention
    from ...parallel.hybrid import cp_attention
    from ...parallel.kernel_block import use_block_kernel
    from ...parallel.plan import single_rank_info

    q, k, v = (x[:, :s_eq].clone().requires_grad_() for x in (case.q, case.k, case.v))
    if use_block_kernel(q):
        cu = None if case.cu is None else case.cu.to(q.device)  # on the device, longest document known: no sync
        mx = None if case.cu is None else int((case.cu[1:] - case.cu[:-1]).max())
        fwd = lambda: flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=mx, return_lse=False)  # noqa: E731
        return fwd, case.dout[:, :s_eq], (q, k, v), "flash kernel"
    info = single_rank_info(batch_size=case.b, seq_len=s_eq, cu_seqlens=case.cu)
    return (lambda: cp_attention(q, k, v, info=info, causal=True)), case.dout[:, :s_eq], (q, k, v), "local block"


def _torch_native(case: Case):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    from ...parallel.plan import ShardPlan

    mesh = init_device_mesh(case.device.type, (case.world,))
    rep = case.hq // case.hkv  # native CP's SDPA path: repeat KV heads (enable_gqa is not sharded by it)
    q, k, v, dout = (x.transpose(1, 2).contiguous() for x in
                     (case.q, case.k.repeat_interleave(rep, 2), case.v.repeat_interleave(rep, 2), case.dout))
    bufs = [q, k, v, dout]

    def run(backward: bool):
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (x.detach().requires_grad_(backward) for x in bufs[:3])
            out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            if backward:
                out.backward(bufs[3])
            return out.transpose(1, 2).detach()

    # native CP's load-balanced causal layout is the same zigzag (chunks r and 2W-1-r) as ours with U=1
    plan = ShardPlan(batch_size=case.b, seq_len=case.s, ring=case.world, ulysses=1, ring_rank=case.rank, ulysses_rank=0)
    with torch.no_grad():
        out = run(False)
    err = float((out.float() - plan.shard(case.ref)).abs().max())
    return run, err


def _yunchang(case: Case):
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    w = case.world
    set_seq_parallel_pg(1, w, case.rank, w)  # ring only (yunchang's ulysses needs heads % world == 0 too)
    attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_FLASH if case.device.type == "cuda"
                                else AttnType.TORCH_MATH)
    n = case.s // w
    sl = slice(case.rank * n, (case.rank + 1) * n)  # 'basic' ring: contiguous shards
    rep = case.hq // case.hkv
    q = case.q[:, sl].contiguous().requires_grad_()
    k = case.k[:, sl].repeat_interleave(rep, 2).contiguous().requires_grad_()
    v = case.v[:, sl].repeat_interleave(rep, 2).contiguous().requires_grad_()
    fwd = lambda: attn(q, k, v, causal=True)
    with torch.no_grad():
        err = float((fwd().float() - case.ref[:, sl]).abs().max())
    return fwd, case.dout[:, sl], (q, k, v), err


# ---------------------------------------------------------------------------------------------------------- main
def _fwd_bwd(fwd, dout, params):
    def step():
        for p in params:
            p.grad = None
        fwd().backward(dout)
    return step


def run_bench(a) -> list[dict]:
    """All rows of the table (every rank returns them; rank 0 prints). Needs an initialised process group."""
    from ...parallel.comm_count import Comm

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    case = Case(a, device, dtype)
    w = case.world
    timing = dict(iters=a.iters, warmup=a.warmup, device=device)
    if case.cu is None:
        flops_rank = causal_flops_fwd_bwd(case.b, case.s, case.hq, case.d) / w
        s_eq = max(2, round(case.s / math.sqrt(w)))  # the same causal work as one rank's share
        base_flops = causal_flops_fwd_bwd(case.b, s_eq, case.hq, case.d)
    else:
        flops_rank = doc_flops_fwd_bwd(case.cu, case.hq, case.d) / w
        s_eq = case.s  # the whole packed row on one device
        base_flops = flops_rank * w
    fwd, dout, params, kind = _single_device(case, s_eq)
    base_ms = _time_ms(_fwd_bwd(fwd, dout, params), **timing)
    base_tflops = base_flops / base_ms / 1e9
    rows = [dict(name=f"single-device ({kind})", layout=f"S={s_eq} on 1 rank", status="ok", fwd_ms=None,
                 fwd_bwd_ms=base_ms, tflops_per_rank=base_tflops, efficiency=1.0, peak_mib=None, max_err=None)]

    def add(name, layout, build):
        row = dict(name=name, layout=layout, status="ok", fwd_ms=None, fwd_bwd_ms=None, tflops_per_rank=None,
                   efficiency=None, peak_mib=None, max_err=None)
        try:
            _reset_mem(device)
            fwd, dout, params, err = build()
            row["max_err"] = err
            with torch.no_grad():
                row["fwd_ms"] = _time_ms(lambda: fwd(), **timing)
            row["fwd_bwd_ms"] = _time_ms(_fwd_bwd(fwd, dout, params), **timing)
            row["tflops_per_rank"] = flops_rank / row["fwd_bwd_ms"] / 1e9
            row["efficiency"] = row["tflops_per_rank"] / base_tflops
            row["peak_mib"] = _peak_mem_mib(device)
        except Exception as e:  # a peer (or a strategy the shape cannot take) reports why instead of a time
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        rows.append(row)

    wanted = [x.strip() for x in a.strategies.split(",") if x.strip()]
    for strategy in wanted:
        if strategy == "ring":
            uly = 1
        elif strategy == "ulysses":
            uly = w
        else:
            uly = a.ulysses or (2 if w % 2 == 0 and w > 2 else 1)
        comm = Comm()

        def build(strategy=strategy, uly=uly, comm=comm):
            fwd, dout, params, err, _layout = _ours(case, strategy, uly, comm)
            return fwd, dout, params, err

        add(f"longreach {strategy}", f"ring={w // uly} ulysses={uly}", build)

    if not a.no_peers and case.cu is not None:  # neither peer takes packed documents through this entry point
        for name in ("torch native context_parallel", "yunchang LongContextAttention"):
            rows.append(dict(name=name, layout="-", status="no packed-document (varlen) support in this API",
                             fwd_ms=None, fwd_bwd_ms=None, tflops_per_rank=None, efficiency=None, peak_mib=None,
                             max_err=None))
    elif not a.no_peers:
        add("torch native context_parallel", f"ring={w} (SDPA)", _native_adapter(case))
        try:
            import yunchang  # noqa: F401
            add("yunchang LongContextAttention", f"ring={w} basic (torch backend)", lambda: _yunchang(case))
        except ImportError as e:
            rows.append(dict(name="yunchang LongContextAttention", layout="-", status=f"not importable ({e.name})",
                             fwd_ms=None, fwd_bwd_ms=None, tflops_per_rank=None, efficiency=None, peak_mib=None,
                             max_err=None))
    return rows


def _native_adapter(case: Case):
    """Fit torch native CP (a context manager that must wrap forward and backward) to ``add``'s (fwd, dout, params)."""

    def build():
        run, err = _torch_native(case)

        class _Out:  # fwd() returns an object whose .backward runs forward+backward inside the CP context
            def __init__(self, with_grad):
                self.with_grad = with_grad

            def backward(self, _dout):
                run(True)

        def fwd():
            if torch.is_grad_enabled():
                return _Out(True)
            return run(False)

        return fwd, None, [], err

    return build


def _fmt(v, spec):
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def table(rows: list[dict], meta: dict) -> str:
    head = (f"CP attention fwd+bwd, world={meta['world']}, {meta['tokens_per_rank']} tokens/rank (S={meta['seq_len']}), "
            f"B={meta['batch']} docs={meta.get('docs', 'none')} Hq={meta['heads']} Hkv={meta['kv_heads']} D={meta['head_dim']} {meta['dtype']} on {meta['device']}")
    cols = f"{'method':32} {'layout':26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'TFLOP/s/rank':>13} {'eff':>6} {'peak MiB':>9} {'max err':>9}  status"
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        lines.append(f"{r['name']:32} {r['layout']:26} {_fmt(r['fwd_ms'], '9.2f')} {_fmt(r['fwd_bwd_ms'], '11.2f')} "
                     f"{_fmt(r['tflops_per_rank'], '13.5f')} {_fmt(r['efficiency'], '6.2f')} {_fmt(r['peak_mib'], '9.0f')} "
                     f"{_fmt(r['max_err'], '9.1e')}  {r['status']}")
    return "\n".join(lines)


def _init_dist() -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        from ..dist import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=600))


def main(argv: Optional[list[str]] = None) -> int:
    a = _parser().parse_args(argv)
    if a.ranks > 1 and "RANK" not in os.environ:  # re-launch ourselves under torchrun (children see RANK)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.ranks}",
               "-m", "longreach.launch.bench.cp"] + list(argv if argv is not None else sys.argv[1:])
        return subprocess.call(cmd)
    logging.basicConfig(level=logging.WARNING)
    _init_dist()
    rows = run_bench(a)
    w = dist.get_world_size()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    meta = dict(world=w, tokens_per_rank=a.tokens_per_rank, seq_len=a.tokens_per_rank * w, batch=a.batch, docs=a.docs, layout=a.layout,
                heads=a.heads,
                kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype, device=dev, iters=a.iters,
                torch=torch.__version__)
    if dist.get_rank() == 0:
        print(table(rows, meta))
        out = a.out or os.path.join("bench", "results", f"cp_{w}ranks_{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
