"""Triton kernel sources for the expert mixture (Punica / vLLM-style shrink and expand).

The functions are plain Python here and are wrapped with ``triton.jit`` on first use by
``triton_kernels``: Triton decides between compiling and interpreting at decoration time
(``TRITON_INTERPRET``), so decorating late lets the CPU tests switch the interpreter on.
Each kernel is self-contained and uses only Triton builtins (no ``tl.zeros``/``tl.max``: those
are ``@jit`` functions of triton's standard library, compiled or interpreted according to the
mode at *triton's* import time, which the interpreter cannot call otherwise).

Shapes use the LoRA convention: ``shrink`` multiplies activations by a rank-r matrix stored
(R, K), ``expand`` multiplies rank-r codes by a matrix stored (N, R), accumulating into the
layer output. Accumulation is in float32; GEMM inputs are cast to the weights' dtype, and
float32 weights multiply in IEEE precision (``DOT_PRECISION``), not TF32.
"""

import triton.language as tl


def shrink_kernel(
    X, W, P, G, COL_EXPERT, SCALE, FLAGS,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pn, stride_gm, stride_ge,
    stride_fm,
    pre_scale, negative_slope,
    HAS_GATES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FLAGS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P[m, n] = G[m, e(n)] * SCALE[e(n)] * act(pre_scale * sum_k X[m, k] W[n, k]).

    Column n of P belongs to expert e(n) = COL_EXPERT[n]; all experts' W rows are stacked,
    so one program computes a tile spanning several experts. FLAGS[pid_m, pid_n] == 0 marks a
    tile whose gates are all zero (top-k routing): it skips its GEMM.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    weight = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32) + 1.0
    if HAS_SCALE:
        e = tl.load(COL_EXPERT + rn, mask=n_mask, other=0)
        col_scale = tl.load(SCALE + e, mask=n_mask, other=0.0).to(tl.float32)
        weight = weight * col_scale[None, :]
        if HAS_GATES:
            g = tl.load(
                G + rm[:, None] * stride_gm + e[None, :] * stride_ge,
                mask=m_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            weight = weight * g.to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    active = 1
    if HAS_FLAGS:
        active = tl.load(FLAGS + pid_m * stride_fm + pid_n)
    if active != 0:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            w = tl.load(
                W + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=n_mask[None, :] & (kk[:, None] < K),
                other=0.0,
            )
            x = tl.load(
                X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=m_mask[:, None] & (kk[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x.to(w.dtype), w, input_precision=DOT_PRECISION)
    acc = acc * pre_scale
    if ACTIVATION:
        acc = tl.where(acc >= 0, acc, acc * negative_slope)
    acc = acc * weight
    tl.store(
        P + rm[:, None] * stride_pm + rn[None, :] * stride_pn,
        acc.to(P.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def expand_kernel(
    P, W, OUT, FLAGS,
    M, N, K,
    stride_pm, stride_pk, stride_wn, stride_wk, stride_om, stride_on, stride_fm,
    HAS_FLAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[m, n] += sum_k P[m, k] W[n, k]: every expert's expand in one GEMM over the stacked
    rank; FLAGS[pid_m, k block] == 0 marks a rank block of zero-gated experts, skipped."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        active = 1
        if HAS_FLAGS:
            active = tl.load(FLAGS + pid_m * stride_fm + k0 // BLOCK_K)
        if active != 0:
            p = tl.load(
                P + rm[:, None] * stride_pm + kk[None, :] * stride_pk,
                mask=m_mask[:, None] & (kk[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                W + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=n_mask[None, :] & (kk[:, None] < K),
                other=0.0,
            )
            acc += tl.dot(p.to(w.dtype), w, input_precision=DOT_PRECISION)
    o_ptrs = OUT + rm[:, None] * stride_om + rn[None, :] * stride_on
    o_mask = m_mask[:, None] & n_mask[None, :]
    acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=o_mask)


def shrink_rows_kernel(
    X, W, P, EXPERT_IDS, OFFSETS, RANKS, SCALE,
    S, K,
    stride_xb, stride_xs, stride_xk, stride_wn, stride_wk, stride_pb, stride_ps, stride_pn,
    pre_scale, negative_slope,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One expert per row (SGMV shrink): P[b, s, :r_e] = SCALE[e] * act(pre_scale * X[b, s] W_e^T)
    with e = EXPERT_IDS[b] and W_e the rows OFFSETS[e] : OFFSETS[e] + RANKS[e] of W. Only the
    row's own expert is read, so the cost does not grow with the number of experts."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tl.program_id(2)
    e = tl.load(EXPERT_IDS + row)
    if e >= 0:
        offset = tl.load(OFFSETS + e)
        rank = tl.load(RANKS + e)
        scale = tl.load(SCALE + e).to(tl.float32)
        rs = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        s_mask = rs < S
        n_mask = rn < rank
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            w = tl.load(
                W + (offset + rn)[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=n_mask[None, :] & (kk[:, None] < K),
                other=0.0,
            )
            x = tl.load(
                X + row * stride_xb + rs[:, None] * stride_xs + kk[None, :] * stride_xk,
                mask=s_mask[:, None] & (kk[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x.to(w.dtype), w, input_precision=DOT_PRECISION)
        acc = acc * pre_scale
        if ACTIVATION:
            acc = tl.where(acc >= 0, acc, acc * negative_slope)
        acc = acc * scale
        tl.store(
            P + row * stride_pb + rs[:, None] * stride_ps + rn[None, :] * stride_pn,
            acc.to(P.dtype.element_ty),
            mask=s_mask[:, None] & n_mask[None, :],
        )


def expand_rows_kernel(
    P, W, OUT, EXPERT_IDS, OFFSETS, RANKS,
    S, N,
    stride_pb, stride_ps, stride_pk, stride_wn, stride_wk, stride_ob, stride_os, stride_on,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One expert per row (SGMV expand): OUT[b, s] += P[b, s, :r_e] W[:, OFFSETS[e] : +r_e]^T."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tl.program_id(2)
    e = tl.load(EXPERT_IDS + row)
    if e >= 0:
        offset = tl.load(OFFSETS + e)
        rank = tl.load(RANKS + e)
        rs = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        s_mask = rs < S
        n_mask = rn < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, rank, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < rank
            w = tl.load(
                W + rn[None, :] * stride_wn + (offset + kk)[:, None] * stride_wk,
                mask=n_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            p = tl.load(
                P + row * stride_pb + rs[:, None] * stride_ps + kk[None, :] * stride_pk,
                mask=s_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += tl.dot(p.to(w.dtype), w, input_precision=DOT_PRECISION)
        o_ptrs = OUT + row * stride_ob + rs[:, None] * stride_os + rn[None, :] * stride_on
        o_mask = s_mask[:, None] & n_mask[None, :]
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=o_mask)
