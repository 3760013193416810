"""Load a Gluon backward variant and call it with the Triton backward's contract.

A variant is ``variants/_base.py`` with ``variants/<name>.py`` (its kernels) spliced in; ``pipelined``, ``e``,
``wsr``, ``wsk`` and ``wsv`` are one change each to ``d`` or ``ws``, applied here as text edits (the runs in the
README were made with exactly these sources)."""
import os
import tempfile
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "# ---- KERNELS (the variant's file is spliced in here by ../common.py) ----\n"


def _sub(src: str, old: str, new: str) -> str:
    assert src.count(old) == 1, old[:80]
    return src.replace(old, new)


def _e(src):  # d with dQ issued before dK, its epilogue under dK, then the prefetch
    src = _sub(src, """                dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_l)
                if ABLATE < 3:
                    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
                else:
                    dq = dq_zero
""", """                dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_l)
                dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
                dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                dq, dv = warpgroup_mma_wait(num_outstanding=1, deps=(dq, dv))
                if ABLATE < 2:
                    tma.store_wait(pendings=DQ_BUFS - 1)
                    dq_s = dq_bufs.index(it % DQ_BUFS)
                    dq_s.store(dq * sm_scale)
                    fence_async_shared()
                    if ABLATE < 1:
                        _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM], dq_s)
""")
    return _sub(src, """                dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
                # buffer st is free: the step STAGES ahead loads into it
                _issue(q_desc, do_desc, bars, q_bufs, do_bufs, it + STAGES, n_total, n_per, lo, q_start,
                       head_base, HEAD_DIM, BLOCK_M, STAGES)
                if ABLATE < 2:
                    tma.store_wait(pendings=DQ_BUFS - 1)  # the reduce that last read this dq buffer is done
                    dq_s = dq_bufs.index(it % DQ_BUFS)
                    dq_s.store(dq * sm_scale)
                    fence_async_shared()
                    if ABLATE < 1:
                        _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM], dq_s)
""", """                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ))
                _issue(q_desc, do_desc, bars, q_bufs, do_bufs, it + STAGES, n_total, n_per, lo, q_start,
                       head_base, HEAD_DIM, BLOCK_M, STAGES)
""")


def _pipelined(src):  # d with the next step's S^T/dP^T issued before this step's dq epilogue (across the loop)
    src = _sub(src, """            mbarrier.wait(kv_bar, 0)
""", """            mbarrier.wait(kv_bar, 0)
            # step 0's S^T and dP^T in flight before the loop; each step issues the next one's before its dq
            # epilogue, so the tensor cores stay busy while dq goes to shared memory and out
            mbarrier.wait(bars.index(0), 0, pred=n_total > 0)
            s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l)
            sT = warpgroup_mma(k_smem, q_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dpT = warpgroup_mma(v_smem, do_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
""")
    src = _sub(src, """                mbarrier.wait(bars.index(st), (it // STAGES) & 1)
                s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l)
                sT = warpgroup_mma(k_smem, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dpT = warpgroup_mma(v_smem, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
""", "")
    src = _sub(src, """                dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
""", """                # the next step's S^T, dP^T (the last step recomputes its own: no load, results unused)
                nxt = gl.minimum(it + 1, n_total - 1)
                ns = nxt % STAGES
                mbarrier.wait(bars.index(ns), (nxt // STAGES) & 1, pred=it + 1 < n_total)
                s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l)
                sT = warpgroup_mma(k_smem, q_bufs.index(ns).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dpT = warpgroup_mma(v_smem, do_bufs.index(ns).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
                dq, dk, dv = warpgroup_mma_wait(num_outstanding=2, deps=(dq, dk, dv))
""")
    return _sub(src, """            tma.store_wait(pendings=0)
            mbarrier.invalidate(kv_bar)""", """            sT, dpT = warpgroup_mma_wait(num_outstanding=0, deps=(sT, dpT))
            tma.store_wait(pendings=0)
            mbarrier.invalidate(kv_bar)""")


def _wsr(src):  # ws with dq added from registers by red.global.add.v2.f32 (no reduce warp, no dq staging)
    src = _sub(src, """            mbarrier.arrive(q_empty.index(st))  # (after a barrier of these warps: every wgmma is done)
            b = it % DQ_BUFS
            mbarrier.wait(dq_empty.index(b), ((it // DQ_BUFS) & 1) ^ 1)
            dq_s = dq_bufs.index(b)
            dq_s.store(dq * sm_scale)
            fence_async_shared()
            mbarrier.arrive(dq_ready.index(b))
""", """            mbarrier.arrive(q_empty.index(st))  # (after a barrier of these warps: every wgmma is done)
            # rows past the document are exact zeros: clamped to its last row
            qr = gl.minimum(start + dq_rows, q_len - 1)
            ptrs = DQ + gl.expand_dims((q_start + qr).to(gl.int64) * stride_dqt + head * HEAD_DIM, 1) \\
                + gl.expand_dims(dq_cols, 0)
            gl.inline_asm_elementwise("red.global.add.v2.f32 [$2], {$4, $5};\\n\\tmov.b32 $0, 0;\\n\\tmov.b32 $1, 0;",
                                      "=r,=r,l,l,f,f", [ptrs.to(gl.int64), dq * sm_scale], dtype=gl.int32,
                                      is_pure=False, pack=2)
""")
    src = _sub(src, """        mbarrier.wait(kv_bar, 0)
        for it in range(n_total):""", """        dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_l))
        dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_l))
        mbarrier.wait(kv_bar, 0)
        for it in range(n_total):""")
    src = _sub(src, "                 LSE2, DELTA, DK, DV, qk_scale,", "                 LSE2, DELTA, DK, DV, DQ, stride_dqt, qk_scale,")
    src = _sub(src, "dq_empty, LSE2, DELTA, DK, DV, qk_scale,", "dq_empty, LSE2, DELTA, DK, DV, DQ, stride_dqt, qk_scale,")
    src = _sub(src, """                (_reducer, (dq_desc, dq_bufs, dq_ready, dq_empty, n_total, n_per, lo, q_start, head_base, HEAD_DIM,
                            BLOCK_M, DQ_BUFS)),
            ], [1, 1], [24, 24])""", """            ], [1], [24])""")
    src = _sub(src, "def _attn_bwd_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE2,",
               "def _attn_bwd_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, DQ, stride_dqt, LSE2,")
    src = _sub(src, "_attn_bwd_sm90[grid](q_desc, k_desc, v_desc, do_desc, dq_desc, lse2,",
               "_attn_bwd_sm90[grid](q_desc, k_desc, v_desc, do_desc, dq_desc, fdq, fdq.stride(0), lse2,")
    return _sub(src, "dq_bufs = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, BLOCK_M, HEAD_DIM], dq_desc.layout)",
                "dq_bufs = ds_smem  # unused")


def _in_regs(which):  # ws with K (or V) held in registers as the A operand of S^T (or dP^T)
    def edit(src):
        src = _sub(src, """        mbarrier.wait(kv_bar, 0)
        for it in range(n_total):""", f"""        mbarrier.wait(kv_bar, 0)
        ka_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2)
        a_reg = {which}_smem.load(ka_l)
        for it in range(n_total):""")
        if which == "k":
            return _sub(src, "sT = warpgroup_mma(k_smem, q_s.permute", "sT = warpgroup_mma(a_reg, q_s.permute")
        return _sub(src, "dpT = warpgroup_mma(v_smem, do_s.permute", "dpT = warpgroup_mma(a_reg, do_s.permute")
    return edit


DERIVED = {"pipelined": ("d", _pipelined), "e": ("d", _e), "wsr": ("ws", _wsr), "wsk": ("ws", _in_regs("k")),
           "wsv": ("ws", _in_regs("v"))}


def source(name: str) -> str:
    parent, edit = DERIVED.get(name, (name, None))
    base = open(os.path.join(HERE, "variants", "_base.py")).read()
    kern = open(os.path.join(HERE, "variants", parent + ".py")).read()
    src = _sub(base, MARK, kern + "\n\n")
    return edit(src) if edit else src


def load(name: str):
    """The variant as a module (its constants, e.g. ``DQ_BUFS``, may be set before a call)."""
    path = os.path.join(tempfile.gettempdir(), f"longreach_gluon_bwd_{name}.py")
    src = source(name)
    with open(path, "w") as f:  # gluon.jit reads the kernels' source from a file
        f.write(src)
    m = types.ModuleType("gluon_bwd_" + name)
    m.__file__ = path
    exec(compile(src, path, "exec"), m.__dict__)
    return m


def backward(mod, do, q, k, v, out, lse, cu, max_len, *, causal, sparse=None, acc=None):
    """-> (dq, dk, dv): bf16 like the inputs, or added into the fp32 ``acc`` buffers (the ring's mode)."""
    scale = q.shape[-1] ** -0.5
    if acc is None:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk, dv = acc[1].clone(), acc[2].clone()
    buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if acc is None else acc[0].clone()
    dense = sparse.dense_heads if sparse is not None else None
    sp = (sparse.block, sparse.window_blocks, sparse.sink_blocks, sparse.stride) if sparse is not None else (128, 1, 0, 1)
    mod.attention_backward(do, q, k, v, out, lse, cu, cu, max_len, max_len, causal=causal, scale=scale, dq=buf, dk=dk,
                           dv=dv, accumulate=acc is not None, sparse=sparse, dense_heads=dense, sp=sp)
    return (buf.to(q.dtype) if acc is None else buf), dk, dv


def data(lens, hq, hkv, d, pat=None, causal=True, dev="cuda"):
    """Random bf16 q/k/v/dout over documents ``lens`` and the Triton forward's out/lse
    -> (do, q, k, v, out, lse, cu, max_len, sparse args, pack)."""
    from longreach.kernels.flash import triton as tk
    from longreach.kernels.s2.triton import sparse_args

    torch.manual_seed(0)
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    sp = sparse_args(pat, hkv, dev) if pat else None
    pack = hq // hkv if pat else 1
    out, lse = tk.attention_forward(q, k, v, cu, cu, max(lens), causal=causal, scale=d ** -0.5,
                                    out_dtype=torch.bfloat16, sparse=sp, pack=pack)
    return do, q, k, v, out, lse, cu, max(lens), sp, pack
