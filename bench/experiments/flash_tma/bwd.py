import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

@triton.jit
def _dkdv_loop(dk, dv, k, v, Qd, DOd, LSE, DELTA, hkv, lo, hi, cols, qk_scale, stride_lh, DQd, sm_scale,
               ATOMIC: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_M // PACK
    offs_m = tl.arange(0, BLOCK_M)
    head = hkv * GROUP + offs_m % PACK
    for start in range(lo, hi, ROWS):
        tok = start + offs_m // PACK
        q = Qd.load([start, hkv * GROUP, 0]).reshape(BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE + head * stride_lh + tok)
        qkT = tl.dot(k, tl.trans(q))
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASK:
            pT = tl.where(cols[:, None] <= tok[None, :], pT, 0.0)
        do = DOd.load([start, hkv * GROUP, 0]).reshape(BLOCK_M, HEAD_DIM)
        delta = tl.load(DELTA + head * stride_lh + tok)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        if ATOMIC:
            dqt = tl.dot(tl.trans(dsT), k)
            DQd.atomic_add([start, hkv * GROUP, 0], dqt.reshape(ROWS, PACK, HEAD_DIM))
        dk = tl.dot(dsT, q, dk)
    return dk, dv

@triton.jit
def dkdv_k(Qd, Kd, Vd, DOd, LSE, DELTA, DKd, DVd, T, qk_scale, sm_scale, stride_lh, DQd, ATOMIC: tl.constexpr,
           GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, N_KV: tl.constexpr):
    # LSE pre-multiplied by log2(e)
    pid = tl.program_id(0)
    hkv = pid % N_KV
    j0 = (pid // N_KV) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    k = Kd.load([j0, hkv * HEAD_DIM])
    v = Vd.load([j0, hkv * HEAD_DIM])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP // PACK):
        dk, dv = _dkdv_loop(dk, dv, k, v, Qd, DOd, LSE, DELTA, hkv, j0, j0 + BLOCK_N, cols, qk_scale, stride_lh, DQd, sm_scale,
                            ATOMIC, True, GROUP, PACK, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_loop(dk, dv, k, v, Qd, DOd, LSE, DELTA, hkv, j0 + BLOCK_N, T, cols, qk_scale, stride_lh, DQd, sm_scale,
                            ATOMIC, False, GROUP, PACK, BLOCK_M, HEAD_DIM)
    DKd.store([j0, hkv * HEAD_DIM], (dk * sm_scale).to(DKd.dtype))
    DVd.store([j0, hkv * HEAD_DIM], dv.to(DVd.dtype))

@triton.jit
def _dq_loop(dq, q, do, lse, delta, Kd, Vd, hkv, lo, hi, tok, qk_scale, MASK: tl.constexpr,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k = Kd.load([start, hkv * HEAD_DIM])
        v = Vd.load([start, hkv * HEAD_DIM])
        qk = tl.dot(q, k.T)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            p = tl.where((start + offs_n)[None, :] <= tok[:, None], p, 0.0)
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq

@triton.jit
def dq_k(Qd, Kd, Vd, DOd, LSE, DELTA, DQd, T, qk_scale, sm_scale, stride_lh, N_TILES, N_HP,
         GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    hp = pid % N_HP
    pid_m = N_TILES - 1 - pid // N_HP
    ROWS: tl.constexpr = BLOCK_M // PACK
    i0 = pid_m * ROWS
    offs_m = tl.arange(0, BLOCK_M)
    tok = i0 + offs_m // PACK
    head = hp * PACK + offs_m % PACK
    hkv = (hp * PACK) // GROUP
    q = Qd.load([i0, hp * PACK, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = DOd.load([i0, hp * PACK, 0]).reshape(BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + head * stride_lh + tok)
    delta = tl.load(DELTA + head * stride_lh + tok)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    safe = (i0 // BLOCK_N) * BLOCK_N
    dq = _dq_loop(dq, q, do, lse, delta, Kd, Vd, hkv, 0, safe, tok, qk_scale, False, BLOCK_N, HEAD_DIM)
    dq = _dq_loop(dq, q, do, lse, delta, Kd, Vd, hkv, safe, i0 + ROWS, tok, qk_scale, True, BLOCK_N, HEAD_DIM)
    DQd.store([i0, hp * PACK, 0], (dq * sm_scale).to(DQd.dtype).reshape(ROWS, PACK, HEAD_DIM))

def descs(q, k, v, do, dq, dk, dv, m1, n1, m2, n2, pack1, pack2):
    d = q.shape[-1]
    D3 = lambda x, r, p: TensorDescriptor(x, list(x.shape), list(x.stride()), [r, p, d])
    D2 = lambda x, r: TensorDescriptor(x.view(x.shape[0], -1), [x.shape[0], x.shape[1] * d], [x.stride(0), 1], [r, d])
    return (D3(q, m1 // pack1, pack1), D2(k, n1), D2(v, n1), D3(do, m1 // pack1, pack1), D2(dk, n1), D2(dv, n1),
            D3(q, m2 // pack2, pack2), D2(k, n2), D2(v, n2), D3(do, m2 // pack2, pack2), D3(dq, m2 // pack2, pack2))

def run(q, k, v, do, lse2, delta, dq, dk, dv, t1=(64, 128, 8, 3), t2=(128, 64, 8, 3), which=("dkdv", "dq"), dq32=None):
    T, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    m1, n1, w1, s1 = t1
    m2, n2, w2, s2 = t2
    qa, ka, va, doa, dka, dva, qb, kb, vb, dob, dqb = descs(q, k, v, do, dq, dk, dv, m1, n1, m2, n2, g, g)
    sc = d ** -0.5
    atomic = dq32 is not None
    if atomic:
        dq32.zero_()
        dqa = TensorDescriptor(dq32, list(dq32.shape), list(dq32.stride()), [m1 // g, g, d])
        which = ("dkdv",)
    else:
        dqa = dka
    if "dkdv" in which:
        dkdv_k[(T // n1 * hkv,)](qa, ka, va, doa, lse2, delta, dka, dva, T, sc * 1.4426950408889634, sc, lse2.stride(0), dqa, atomic,
            GROUP=g, PACK=g, HEAD_DIM=d, BLOCK_M=m1, BLOCK_N=n1, N_KV=hkv, num_warps=w1, num_stages=s1)
    if "dq" in which:
        nt = T // (m2 // g)
        dq_k[(nt * hkv,)](qb, kb, vb, dob, lse2, delta, dqb, T, sc * 1.4426950408889634, sc, lse2.stride(0), nt, hkv,
            GROUP=g, PACK=g, HEAD_DIM=d, BLOCK_M=m2, BLOCK_N=n2, num_warps=w2, num_stages=s2)
    if atomic:
        torch.mul(dq32, sc, out=dq)
    return dq, dk, dv
