# Gluon backward variant 'd': the kernels only (see ../README.md; ../common.py adds _base.py)
if HAVE_GLUON:

    @gluon.jit
    def _issue(q_desc, do_desc, bars, q_bufs, do_bufs, it, n_total, n_per, lo, q_start, head_base,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        # TMA loads of q and dout for flat step ``it`` (q head head_base + it // n_per, tokens lo + (it % n_per) *
        # BLOCK_M ...) into buffer it % STAGES; nothing past the last step
        ok = it < n_total
        s = it % STAGES
        g = it // gl.maximum(n_per, 1)
        row = q_start + lo + (it - g * n_per) * BLOCK_M
        col = (head_base + g) * HEAD_DIM
        bar = bars.index(s)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_bufs.index(s), pred=ok)
        tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_bufs.index(s), pred=ok)

    @gluon.jit
    def _attn_bwd_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE2, DELTA, DK, DV, CU_Q, CU_K, DENSE,
                       qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       sp_block, sp_window, sp_sink, sp_stride, N_KV,
                       GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, DQ_BUFS: gl.constexpr, ABLATE: gl.constexpr, num_warps: gl.constexpr):
        # layouts: S^T/dP^T [BLOCK_N, BLOCK_M] and dK/dV [BLOCK_N, D] over 2 warpgroups along the keys; dQ
        # [BLOCK_M, D] over the warpgroups along D
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
        dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                       instr_shape=[16, HEAD_DIM // (num_warps // 4), 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        col_l: gl.constexpr = gl.SliceLayout(0, s_l)  # per q row (S^T columns)
        row_l: gl.constexpr = gl.SliceLayout(1, s_l)  # per key (S^T rows)
        ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], gl.bfloat16)

        pid = gl.program_id(0)
        doc = gl.program_id(1)
        hkv = pid % N_KV
        pid_n = pid // N_KV
        q_start = gl.load(CU_Q + doc)
        q_len = gl.load(CU_Q + doc + 1) - q_start
        k_start = gl.load(CU_K + doc)
        k_len = gl.load(CU_K + doc + 1) - k_start
        j0 = pid_n * BLOCK_N
        if j0 < k_len:
            dtype: gl.constexpr = k_desc.dtype
            k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
            q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
            ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_sl)
            dq_bufs = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, BLOCK_M, HEAD_DIM], dq_desc.layout)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_bar, count=1)
            for i in gl.static_range(STAGES):
                mbarrier.init(bars.index(i), count=1)

            # the q range that sees this KV tile: causal from its first key; S2: the window's q blocks, or all
            # later ones for a sink / on-shard key block
            q_hi = q_len
            if SPARSE:
                kb = j0 // sp_block
                dense = gl.load(DENSE + hkv)
                s = gl.where(dense != 0, 1, sp_stride)
                everyone = (kb < sp_sink) | (kb % s == hkv % s)
                q_hi = gl.where(everyone, q_len, gl.minimum(q_len, (kb + sp_window) * sp_block))
            if CAUSAL:
                lo = j0
            else:
                lo = j0 * 0
            n_per = gl.cdiv(gl.maximum(q_hi - lo, 0), BLOCK_M)
            n_total = n_per * GROUP
            head_base = hkv * GROUP
            kv_partial = j0 + BLOCK_N > k_len

            mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_start + j0, hkv * HEAD_DIM], kv_bar, k_smem)
            tma.async_copy_global_to_shared(v_desc, [k_start + j0, hkv * HEAD_DIM], kv_bar, v_smem)
            for i in gl.static_range(STAGES):
                _issue(q_desc, do_desc, bars, q_bufs, do_bufs, i, n_total, n_per, lo, q_start, head_base,
                       HEAD_DIM, BLOCK_M, STAGES)

            dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
            dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
            cols = j0 + gl.arange(0, BLOCK_N, layout=row_l)  # key index in the document
            offs_m = gl.arange(0, BLOCK_M, layout=col_l)
            mbarrier.wait(kv_bar, 0)
            for it in range(n_total):
                st = it % STAGES
                g = it // n_per
                start = lo + (it - g * n_per) * BLOCK_M
                head = head_base + g
                tok = start + offs_m
                row_ok = tok < q_len
                lse = gl.load(LSE2 + head * stride_lh + q_start + tok, mask=row_ok, other=float("inf"))
                q_s = q_bufs.index(st)
                do_s = do_bufs.index(st)
                mbarrier.wait(bars.index(st), (it // STAGES) & 1)
                s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l)
                sT = warpgroup_mma(k_smem, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dpT = warpgroup_mma(v_smem, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))
                pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse, 0))
                masked = kv_partial | (start + BLOCK_M > q_len)
                if CAUSAL:
                    masked = masked | (start < j0 + BLOCK_N)
                if masked:
                    ok = gl.expand_dims(cols < k_len, 1) & gl.expand_dims(row_ok, 0)
                    if CAUSAL:
                        ok = ok & (gl.expand_dims(cols, 1) <= gl.expand_dims(tok, 0))
                    pT = gl.where(ok, pT, 0.0)
                p16 = gl.convert_layout(pT.to(dtype), a_l)
                dv = warpgroup_mma(p16, do_s, dv, is_async=True)
                delta = gl.load(DELTA + head * stride_lh + q_start + tok, mask=row_ok, other=0.0)
                dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
                dsT = (pT * (dpT - gl.expand_dims(delta, 0))).to(dtype)
                if ABLATE < 3:
                    ds_smem.store(dsT)
                    fence_async_shared()
                dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_l)
                if ABLATE < 3:
                    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
                else:
                    dq = dq_zero
                dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
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
            tma.store_wait(pendings=0)
            mbarrier.invalidate(kv_bar)
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(bars.index(i))

            dk = dk * sm_scale
            o_l: gl.constexpr = gl.SliceLayout(1, kv_l)
            d_l: gl.constexpr = gl.SliceLayout(0, kv_l)
            ck = j0 + gl.arange(0, BLOCK_N, layout=o_l)
            cd = gl.arange(0, HEAD_DIM, layout=d_l)
            ok2 = gl.expand_dims(ck < k_len, 1)
            rows = (k_start + ck).to(gl.int64)
            dk_ptrs = DK + gl.expand_dims(rows * stride_dkt + hkv * stride_dkh, 1) + gl.expand_dims(cd, 0)
            dv_ptrs = DV + gl.expand_dims(rows * stride_dvt + hkv * stride_dvh, 1) + gl.expand_dims(cd, 0)
            if ACC:
                dk += gl.load(dk_ptrs, mask=ok2, other=0.0)
                dv += gl.load(dv_ptrs, mask=ok2, other=0.0)
            gl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok2)
            gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok2)
