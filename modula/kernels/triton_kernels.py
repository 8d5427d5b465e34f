"""Fused Triton expert mixture: the default on CUDA, and the one-expert-per-row serving kernel.

Forward: a fused shrink (GEMM + LeakyReLU + per-expert gate and scaling in the epilogue) into a
float32 code buffer, then one expand GEMM accumulated into the layer output. One expert per row
(requests pinned to a domain in a mixed serving batch) reads only that row's expert (SGMV).

Backward: the autograd wrapper saves only the inputs and recomputes the mixture with the
``stacked`` torch path to get gradients (activation recomputation), so training on a GPU works
with this backend while the hot inference path stays fused.

On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1`` (tests; fp32/fp16 only,
the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .stacked import stacked_mixture
from .types import ExpertStack, Residual, residual_feed

__all__ = ["expand", "expand_rows", "interpreting", "shrink", "shrink_rows", "tile_flags",
           "triton_mixture"]

_JIT_CACHE: dict[bool, dict[str, Any]] = {}


def interpreting() -> bool:
    """Whether Triton would interpret kernels on the CPU now (``TRITON_INTERPRET``)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _kernels() -> dict[str, Any]:
    """The kernels, jitted (or interpreted) according to the current ``TRITON_INTERPRET``."""
    mode = interpreting()
    cached = _JIT_CACHE.get(mode)
    if cached is None:
        import triton

        from . import _triton_src as src

        cached = {
            name: triton.jit(getattr(src, name))
            for name in ("shrink_kernel", "expand_kernel", "shrink_rows_kernel", "expand_rows_kernel")
        }
        _JIT_CACHE[mode] = cached
    return cached


def _block(n: int, cap: int) -> int:
    """A power-of-two tile edge in [16, cap] covering ``n`` if possible (tl.dot needs >= 16)."""
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


def _precision(weights: Tensor) -> str | None:
    """IEEE products for float32 weights (Triton would use TF32 on a GPU); the default (None)
    for half types, where the choice does not apply."""
    return "ieee" if weights.dtype == torch.float32 else None


def _check_device(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_cuda and not interpreting():
            raise RuntimeError(
                "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                "use backend='stacked' on the CPU"
            )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_flags(active: Tensor, col_group: Tensor, block_m: int, block_c: int) -> Tensor:
    """(M blocks, column blocks) int32: 1 where some token of the row block has a non-zero
    gate for some expert owning a column of the column block. ``active`` (M, G) says which
    (token, expert) gates are non-zero; ``col_group`` (C,) maps columns to experts."""
    M, G = active.shape
    Mb = _cdiv(M, block_m)
    rows = torch.nn.functional.pad(active, (0, 0, 0, Mb * block_m - M))
    per_block = rows.view(Mb, block_m, G).any(1)
    C = col_group.numel()
    cover = torch.zeros(_cdiv(C, block_c), G, dtype=torch.bool, device=active.device)
    cover[torch.arange(C, device=active.device) // block_c, col_group.long()] = True
    return ((per_block.float() @ cover.float().t()) > 0).to(torch.int32).contiguous()


def shrink(
    x: Tensor,
    W: Tensor,
    P: Tensor,
    *,
    gates: Tensor | None = None,
    col_expert: Tensor | None = None,
    scale: Tensor | None = None,
    pre_scale: float = 1.0,
    negative_slope: float | None = None,
) -> None:
    """``P = weight * act(pre_scale * x W^T)`` for x (M, K), W (N, K), P (M, N) (may be a
    column slice of a wider buffer). ``col_expert``/``scale``/``gates`` give the per-column
    expert, the per-expert scaling and per-token expert gates; tiles without a non-zero gate
    skip their GEMM."""
    M, K = x.shape
    N = W.shape[0]
    if M == 0 or N == 0:
        return
    has_scale = scale is not None
    has_gates = gates is not None
    BM, BN, BK = _block(M, 64), _block(N, 64), _block(K, 64)
    flags = tile_flags(gates != 0, col_expert, BM, BN) if has_gates else None
    dummy = P
    _kernels()["shrink_kernel"][(_cdiv(M, BM), _cdiv(N, BN))](
        x, W, P,
        gates if has_gates else dummy,
        col_expert if has_scale else dummy,
        scale if has_scale else dummy,
        flags if has_gates else dummy,
        M, N, K,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), P.stride(0), P.stride(1),
        gates.stride(0) if has_gates else 0, gates.stride(1) if has_gates else 0,
        flags.stride(0) if has_gates else 0,
        float(pre_scale), float(negative_slope or 0.0),
        HAS_GATES=has_gates, HAS_SCALE=has_scale, HAS_FLAGS=has_gates,
        ACTIVATION=negative_slope is not None,
        DOT_PRECISION=_precision(W), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )


def expand(
    P: Tensor,
    W: Tensor,
    out: Tensor,
    *,
    active: Tensor | None = None,
    col_group: Tensor | None = None,
) -> None:
    """``out += P W^T`` for P (M, K), W (N, K), out (M, N). With ``active``/``col_group``
    (see ``tile_flags``), rank blocks of zero-gated experts are skipped."""
    M, K = P.shape
    N = W.shape[0]
    if M == 0 or K == 0:
        return
    BM, BN, BK = _block(M, 64), _block(N, 64), _block(K, 64)
    has_flags = active is not None
    flags = tile_flags(active, col_group, BM, BK) if has_flags else None
    _kernels()["expand_kernel"][(_cdiv(M, BM), _cdiv(N, BN))](
        P, W, out, flags if has_flags else P, M, N, K,
        P.stride(0), P.stride(1), W.stride(0), W.stride(1), out.stride(0), out.stride(1),
        flags.stride(0) if has_flags else 0,
        HAS_FLAGS=has_flags,
        DOT_PRECISION=_precision(W), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )


def shrink_rows(
    x: Tensor,
    W: Tensor,
    P: Tensor,
    ids: Tensor,
    offsets: Tensor,
    ranks: Tensor,
    scale: Tensor,
    *,
    negative_slope: float | None = None,
) -> None:
    """One expert per row: x (B, S, K), W (R, K) stacked, P (B, S, r_max)."""
    rows, S, K = x.shape
    r_max = P.shape[2]
    BM, BN, BK = _block(S, 64), _block(r_max, 64), _block(K, 64)
    _kernels()["shrink_rows_kernel"][(_cdiv(S, BM), _cdiv(r_max, BN), rows)](
        x, W, P, ids, offsets, ranks, scale, S, K,
        x.stride(0), x.stride(1), x.stride(2), W.stride(0), W.stride(1),
        P.stride(0), P.stride(1), P.stride(2),
        1.0, float(negative_slope or 0.0),
        ACTIVATION=negative_slope is not None,
        DOT_PRECISION=_precision(W), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )


def expand_rows(
    P: Tensor, W: Tensor, out: Tensor, ids: Tensor, offsets: Tensor, ranks: Tensor
) -> None:
    """One expert per row: out (B, S, N) += P (B, S, r_e) W_e^T, W (N, R) stacked."""
    rows, S, r_max = P.shape
    N = W.shape[0]
    BM, BN, BK = _block(S, 64), _block(N, 64), _block(r_max, 64)
    _kernels()["expand_rows_kernel"][(_cdiv(S, BM), _cdiv(N, BN), rows)](
        P, W, out, ids, offsets, ranks, S, N,
        P.stride(0), P.stride(1), P.stride(2), W.stride(0), W.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DOT_PRECISION=_precision(W), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )


def _expert_tables(experts: ExpertStack, device: torch.device) -> dict[str, Tensor]:
    ranks = torch.tensor(experts.ranks, dtype=torch.int32, device=device)
    return {
        "col_expert": torch.repeat_interleave(
            torch.arange(experts.n_experts, dtype=torch.int32, device=device), ranks.long()
        ).to(torch.int32),
        "scale": torch.tensor(experts.scaling, dtype=torch.float32, device=device),
        "offsets": torch.tensor(experts.offsets[:-1], dtype=torch.int32, device=device),
        "ranks": ranks,
    }


def _forward(
    x: Tensor,
    experts: ExpertStack | None,
    gates: Tensor | None,
    ids: Tensor | None,
    residual: Residual | None,
    slope: float,
    out: Tensor,
) -> None:
    """Accumulate the mixture into ``out`` (contiguous, x's leading shape + d_out)."""
    d_in = x.shape[-1]
    d_out = out.shape[-1]
    x2 = x.reshape(-1, d_in).contiguous()
    T = x2.shape[0]
    out2 = out.view(T, d_out)  # out may be (..., d_out) or flat (T, d_out)
    tables = _expert_tables(experts, x.device) if experts is not None else None
    code = None
    if residual is not None:
        r_u = residual.A.shape[0]
        width = r_u + (sum(experts.ranks) if experts is not None and ids is None else 0)
        P = torch.empty(T, width, dtype=torch.float32, device=x.device)
        code = P[:, :r_u]
        shrink(x2, residual.A.contiguous(), code, pre_scale=residual.scaling)
    if ids is not None:
        rows = x.shape[0]
        S = T // rows
        if residual is not None:
            expand(code, residual.B, out2)
            feed = residual_feed(code, residual).reshape(rows, S, -1)
            W_in = (experts.A @ residual.B).contiguous()
        else:
            feed = x2.view(rows, S, d_in)
            W_in = experts.A.contiguous()
        P_rows = torch.empty(rows, S, max(experts.ranks), dtype=torch.float32, device=x.device)
        ids32 = ids.to(torch.int32).contiguous()
        shrink_rows(
            feed, W_in, P_rows, ids32, tables["offsets"], tables["ranks"], tables["scale"],
            negative_slope=slope if residual is not None else None,
        )
        expand_rows(
            P_rows, experts.B, out.view(rows, S, d_out), ids32, tables["offsets"], tables["ranks"]
        )
        return
    g2 = gates.reshape(T, -1).contiguous() if gates is not None else None
    active = g2 != 0 if g2 is not None else None
    if residual is not None:
        if experts is None:
            expand(P, residual.B, out2)
            return
        shrink(
            residual_feed(code, residual), (experts.A @ residual.B).contiguous(),
            P[:, code.shape[1]:],
            gates=g2, col_expert=tables["col_expert"], scale=tables["scale"],
            negative_slope=slope,
        )
        if active is not None:
            # the code columns (group E) are always live; the domain columns follow the gates
            E = experts.n_experts
            active = torch.cat([active, active.new_ones(T, 1)], 1)
            groups = torch.cat(
                [torch.full((code.shape[1],), E, dtype=torch.int32, device=x.device), tables["col_expert"]]
            )
        expand(
            P, torch.cat([residual.B, experts.B], 1), out2,
            active=active, col_group=groups if active is not None else None,
        )
        return
    P = torch.empty(T, sum(experts.ranks), dtype=torch.float32, device=x.device)
    shrink(
        x2, experts.A.contiguous(), P,
        gates=g2, col_expert=tables["col_expert"], scale=tables["scale"],
    )
    expand(P, experts.B, out2, active=active, col_group=tables["col_expert"])


def _run(x, experts, gates, ids, residual, slope) -> Tensor:
    d_out = residual.B.shape[0] if residual is not None else experts.out_features
    delta = torch.zeros(*x.shape[:-1], d_out, dtype=x.dtype, device=x.device)
    _forward(x, experts, gates, ids, residual, slope, delta)
    return delta


class _TritonMixture(torch.autograd.Function):
    """Fused forward; backward by recomputing with the stacked torch path."""

    @staticmethod
    def forward(ctx, x, A, B, gates, ids, rA, rB, meta):
        ranks, scaling, r_scaling, r_eps, slope = meta
        experts = ExpertStack(A, B, ranks, scaling) if A is not None else None
        residual = Residual(rA, rB, r_scaling, r_eps) if rA is not None else None
        ctx.save_for_backward(x, A, B, gates, ids, rA, rB)
        ctx.meta = meta
        return _run(x, experts, gates, ids, residual, slope)

    @staticmethod
    def backward(ctx, grad):
        x, A, B, gates, ids, rA, rB = ctx.saved_tensors
        ranks, scaling, r_scaling, r_eps, slope = ctx.meta
        need = ctx.needs_input_grad
        slots = {0: x, 1: A, 2: B, 3: gates, 5: rA, 6: rB}
        leaves = {
            i: (t.detach().requires_grad_(bool(need[i])) if t is not None else None)
            for i, t in slots.items()
        }
        with torch.enable_grad():
            experts = ExpertStack(leaves[1], leaves[2], ranks, scaling) if A is not None else None
            residual = (Residual(leaves[5], leaves[6], r_scaling, r_eps) if rA is not None
                        else None)
            delta = stacked_mixture(leaves[0], experts, leaves[3], ids, residual, slope, None)
        wanted = [i for i, t in leaves.items() if t is not None and need[i]]
        grads = torch.autograd.grad(delta, [leaves[i] for i in wanted], grad, allow_unused=True)
        result: list[Tensor | None] = [None] * 8
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return tuple(result)


def triton_mixture(
    x: Tensor,
    experts: ExpertStack | None,
    gates: Tensor | None,
    expert_ids: Tensor | None,
    residual: Residual | None,
    negative_slope: float,
    out: Tensor | None,
) -> Tensor:
    _check_device(x)
    tensors = [x, gates]
    if experts is not None:
        tensors += [experts.A, experts.B]
    if residual is not None:
        tensors += [residual.A, residual.B]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    if not needs_grad and out is not None and out.is_contiguous():
        _forward(x, experts, gates, expert_ids, residual, negative_slope, out)
        return out
    if needs_grad:
        meta = (
            experts.ranks if experts else None,
            experts.scaling if experts else None,
            residual.scaling if residual else None,
            residual.norm_eps if residual else None,
            negative_slope,
        )
        delta = _TritonMixture.apply(
            x,
            experts.A if experts else None,
            experts.B if experts else None,
            gates,
            expert_ids,
            residual.A if residual else None,
            residual.B if residual else None,
            meta,
        )
    else:
        delta = _run(x, experts, gates, expert_ids, residual, negative_slope)
    return delta if out is None else out.add_(delta.view(out.shape))
