# Gluon backward variant 'ws': the kernels only (see ../README.md; ../common.py adds _base.py)
if HAVE_GLUON:

    @gluon.jit
    def _step(it, n_per, lo, q_start, head_base, BLOCK_M: gl.constexpr):
        # flat step -> (q head, first token of its q tile in the document)
        g = it // gl.maximum(n_per, 1)
        return head_base + g, lo + (it - g * n_per) * BLOCK_M

    @gluon.jit
    def _loader(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
                n_total, n_per, lo, q_start, head_base, k_row, hkv,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        # one warp: K/V once, then q/dout per step into a ring of STAGES buffers (freed by the compute warps)
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row, hkv * HEAD_DIM], kv_bar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [k_row, hkv * HEAD_DIM], kv_bar, v_smem)
        for it in range(n_total):
            st = it % STAGES
            mbarrier.wait(q_empty.index(st), ((it // STAGES) & 1) ^ 1)
            head, start = _step(it, n_per, lo, q_start, head_base, BLOCK_M)
            bar = q_ready.index(st)
            mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_start + start, head * HEAD_DIM], bar, q_bufs.index(st))
            tma.async_copy_global_to_shared(do_desc, [q_start + start, head * HEAD_DIM], bar, do_bufs.index(st))

    @gluon.jit
    def _reducer(dq_desc, dq_bufs, dq_ready, dq_empty, n_total, n_per, lo, q_start, head_base,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, DQ_BUFS: gl.constexpr):
        # one warp: each step's dq tile, staged in shared memory by the compute warps, added into the fp32 dq
        for it in range(n_total):
            b = it % DQ_BUFS
            mbarrier.wait(dq_ready.index(b), (it // DQ_BUFS) & 1)
            head, start = _step(it, n_per, lo, q_start, head_base, BLOCK_M)
            _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM], dq_bufs.index(b))
            tma.store_wait(pendings=0)  # the buffer has been read
            mbarrier.arrive(dq_empty.index(b))

    @gluon.jit
    def _compute(k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_bufs, kv_bar, q_ready, q_empty, dq_ready, dq_empty,
                 LSE2, DELTA, DK, DV, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                 n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv,
                 CAUSAL: gl.constexpr, ACC: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DQ_BUFS: gl.constexpr, num_warps: gl.constexpr):
        # two warpgroups: S^T/dP^T [BLOCK_N, BLOCK_M] and dK/dV [BLOCK_N, D] split along the keys, dQ [BLOCK_M, D]
        # along D
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
        dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                       instr_shape=[16, HEAD_DIM // (num_warps // 4), 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        col_l: gl.constexpr = gl.SliceLayout(0, s_l)  # per q row (S^T columns)
        row_l: gl.constexpr = gl.SliceLayout(1, s_l)  # per key (S^T rows)
        dtype: gl.constexpr = k_smem.dtype
        kv_partial = j0 + BLOCK_N > k_len
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
        cols = j0 + gl.arange(0, BLOCK_N, layout=row_l)  # key index in the document
        offs_m = gl.arange(0, BLOCK_M, layout=col_l)
        mbarrier.wait(kv_bar, 0)
        for it in range(n_total):
            st = it % STAGES
            head, start = _step(it, n_per, lo, q_start, head_base, BLOCK_M)
            tok = start + offs_m
            row_ok = tok < q_len
            lse = gl.load(LSE2 + head * stride_lh + q_start + tok, mask=row_ok, other=float("inf"))
            delta = gl.load(DELTA + head * stride_lh + q_start + tok, mask=row_ok, other=0.0)
            mbarrier.wait(q_ready.index(st), (it // STAGES) & 1)
            q_s = q_bufs.index(st)
            do_s = do_bufs.index(st)
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
            dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
            dsT = (pT * (dpT - gl.expand_dims(delta, 0))).to(dtype)
            ds_smem.store(dsT)
            fence_async_shared()
            dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
            dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_l)
            dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
            dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
            mbarrier.arrive(q_empty.index(st))  # (after a barrier of these warps: every wgmma is done)
            b = it % DQ_BUFS
            mbarrier.wait(dq_empty.index(b), ((it // DQ_BUFS) & 1) ^ 1)
            dq_s = dq_bufs.index(b)
            dq_s.store(dq * sm_scale)
            fence_async_shared()
            mbarrier.arrive(dq_ready.index(b))

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

    @gluon.jit
    def _attn_bwd_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE2, DELTA, DK, DV, CU_Q, CU_K, DENSE,
                       qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       sp_block, sp_window, sp_sink, sp_stride, N_KV,
                       GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, DQ_BUFS: gl.constexpr, ABLATE: gl.constexpr, num_warps: gl.constexpr):
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
            ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
            k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
            q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
            ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_sl)
            dq_bufs = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, BLOCK_M, HEAD_DIM], dq_desc.layout)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            dq_ready = gl.allocate_shared_memory(gl.int64, [DQ_BUFS, 1], mbarrier.MBarrierLayout())
            dq_empty = gl.allocate_shared_memory(gl.int64, [DQ_BUFS, 1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_bar, count=1)
            for i in gl.static_range(STAGES):
                mbarrier.init(q_ready.index(i), count=1)
                mbarrier.init(q_empty.index(i), count=1)
            for i in gl.static_range(DQ_BUFS):
                mbarrier.init(dq_ready.index(i), count=1)
                mbarrier.init(dq_empty.index(i), count=1)

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
            gl.warp_specialize([
                (_compute, (k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_bufs, kv_bar, q_ready, q_empty, dq_ready,
                            dq_empty, LSE2, DELTA, DK, DV, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh,
                            stride_dvt, stride_dvh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0,
                            head_base, hkv, CAUSAL, ACC, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, DQ_BUFS, num_warps)),
                (_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready,
                           q_empty, n_total, n_per, lo, q_start, head_base, k_start + j0, hkv, HEAD_DIM, BLOCK_M,
                           STAGES)),
                (_reducer, (dq_desc, dq_bufs, dq_ready, dq_empty, n_total, n_per, lo, q_start, head_base, HEAD_DIM,
                            BLOCK_M, DQ_BUFS)),
            ], [1, 1], [24, 24])
