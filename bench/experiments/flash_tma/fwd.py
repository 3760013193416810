import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

@triton.jit
def _fwd_loop(acc, l_i, m_i, q, Kd, Vd, hkv, lo, hi, tok, qk_scale, MASK: tl.constexpr, WS: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = Kd.load([start, hkv * HEAD_DIM])
        qk = tl.dot(q, k.T)
        if MASK:
            qk = tl.where((start + offs_n)[None, :] <= tok[:, None], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = Vd.load([start, hkv * HEAD_DIM])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i

@triton.jit
def fwd_tma(Qd, Kd, Vd, Od, LSE, T, qk_scale, stride_lh, N_TILES, N_HP,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            WS: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % N_HP
    pid_m = N_TILES - 1 - pid // N_HP
    hkv = h // GROUP
    i0 = pid_m * BLOCK_M
    tok = i0 + tl.arange(0, BLOCK_M)
    q = Qd.load([i0, h * HEAD_DIM])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, Kd, Vd, hkv, 0, i0, tok, qk_scale, False, WS, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, Kd, Vd, hkv, i0, i0 + BLOCK_M, tok, qk_scale, True, WS, BLOCK_N, HEAD_DIM)
    out = acc / l_i[:, None]
    Od.store([i0, h * HEAD_DIM], out.to(Od.dtype))
    tl.store(LSE + h * stride_lh + tok, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)

def run(m=128, n=128, w=8, s=3, ws=False, T=1024, hq=32, hkv=8, d=128, q=None, k=None, v=None, out=None, lse=None):
    if q is None:
        q = torch.randn(T, hq, d, dtype=torch.bfloat16)
        k = torch.randn(T, hkv, d, dtype=torch.bfloat16); v = torch.randn_like(k)
        out = torch.empty_like(q); lse = torch.empty(hq, T)
    T, hq, d = q.shape
    hkv = k.shape[1]
    q2, k2, v2, o2 = (x.view(x.shape[0], -1) for x in (q, k, v, out))
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [m, d])
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [n, d])
    vd = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [n, d])
    od = TensorDescriptor(o2, list(o2.shape), list(o2.stride()), [m, d])
    nt = T // m
    fwd_tma[(nt * hq,)](qd, kd, vd, od, lse, T, d ** -0.5 * 1.4426950408889634, lse.stride(0), nt, hq,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=m, BLOCK_N=n, WS=ws, num_warps=w, num_stages=s)
    return out, lse
