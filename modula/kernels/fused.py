"""The inference fast path: adapted linears that read the same input, fused into one GEMM.

At inference the experts do not change between forwards, so everything that depends only on
the weights is derived once (:func:`fuse_linears`) and a forward is one GEMM over the input,
a few ops on its narrow columns, and one expand GEMM per member. For ``m`` members (one adapted
linear, or the q/k/v or gate/up projections of a block) the GEMM's matrix is, row-wise::

    [ W0_1 .. W0_m | block_1 .. block_m | W_R,1 .. W_R,m ]

- ``W0_j``: the frozen base weights (when they can share the GEMM: a plain ``nn.Linear`` of the
  adapters' dtype); member ``j``'s output is then a column slice of the result;
- ``block_j``: MoDULA-Res and LoRA: the universal expert's code ``s* A*_j`` (added ungated,
  ``h = B* code``); MoDULA-Flan and MoLoRA: the gated experts' ``A_i``;
- ``W_R,j``: the router rows.

MoDULA-Res's domain experts read ``h``: ``A_i h = (A_i B*) code``, so their shrink is one
batched GEMM of the codes by the small ``C_j = A_cat B*`` (sum r_i x r*), never a pass over the
d_out-wide ``h``. Then per token: ``1 / RMS(h)`` (the ``rms`` input option, from the Gram
matrix of ``B*``), LeakyReLU, the gates (softmax of the router logits, or the weights a caller
fixed or pinned per row). Member ``j``'s output gets ``[code_j, gated shrink_j]`` times
``[B*_j, s_i B_i ..]^T`` in one ``addmm_``: the expand matrices carry the LoRA scalings.

Nothing here tracks gradients: it is the inference representation a model builds once per set
of weights (``ModulaModel.prepare_inference``); ``reference`` stays the oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import ExpertStack, Residual, residual_gram

__all__ = ["FusedLinears", "FusedMember", "fuse_linears", "fused_forward"]

# the fused matrix has a multiple of this many rows (zero rows pad it), so every row of the
# result starts 64-byte aligned: MKL runs 3-4x slower on an output whose row stride is not
# (measured on AVX2: a GEMM with 1042 columns against 1040 or 1056, and the expand's addmm_
# into a column slice of such a result)
ALIGN = 16


class FusedMember(NamedTuple):
    """One adapted linear, as tensors: the base (``weight`` None when it cannot share the
    GEMM), the ungated universal expert (``residual``: Res, and LoRA's single adapter), the
    gated experts and the router rows (``router`` (n_gates, d_in), None without a router)."""

    weight: Tensor | None
    bias: Tensor | None
    residual: Residual | None
    experts: ExpertStack | None
    router: Tensor | None
    res_domains: bool  # the gated experts read h (MoDULA-Res), through LeakyReLU


@dataclass(eq=False)
class FusedLinears:
    """``m`` adapted linears reading one input, derived for inference (see the module doc)."""

    W_t: Tensor  # (d_in, width): a transposed view of the contiguous (width, d_in) matrix
    bias: Tensor | None  # (width,) when a member has a bias and the base is fused
    out_features: tuple[int, ...]
    base_fused: bool
    code_width: int  # r* when the universal expert is ungated, else 0
    ranks: tuple[int, ...]  # the gated experts' ranks (empty: none)
    W_out_t: tuple[Tensor, ...]  # per member (code_width + R, d_out_j)
    C_t: Tensor | None  # Res with domain experts: (m, r*, R), (A_cat B*)^T per member
    slope: float | None  # LeakyReLU slope (Res domain experts), else None
    norm_eps: float | None  # Res domain experts read h / RMS(h)
    gram: Tensor | None  # (m, r*, r*) float64: B*^T B* per member, with norm_eps
    out_size: Tensor | None  # (m, 1) float64: d_out per member, with norm_eps
    routed: bool  # the result holds router logits after the blocks

    @property
    def members(self) -> int:
        return len(self.out_features)

    @property
    def n_gates(self) -> int:
        return len(self.ranks)

    @property
    def block(self) -> int:
        """Columns per member in the GEMM's result after the base: the code (Res, LoRA) or
        the gated experts' shrink (Flan, MoLoRA)."""
        return self.code_width if self.code_width else sum(self.ranks)

    @property
    def base_width(self) -> int:
        return sum(self.out_features) if self.base_fused else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.W_t.dtype


def fuse_linears(members: Sequence[FusedMember], negative_slope: float = 0.01) -> FusedLinears:
    """Derive the fused matrices of ``members`` (all reading the same ``d_in``-wide input, all
    with the same expert layout). Either every member's base is fused or none.
    ``negative_slope``: Res's LeakyReLU."""
    if not members:
        raise ValueError("fuse_linears needs at least one member")
    first = members[0]
    base_fused = first.weight is not None
    d_in = _d_in(first)
    ranks = first.experts.ranks if first.experts is not None else ()
    code_width = first.residual.A.shape[0] if first.residual is not None else 0
    norm_eps = first.residual.norm_eps if first.residual is not None else None
    for m in members:
        if (m.weight is not None) != base_fused or _d_in(m) != d_in or (
                (m.experts.ranks if m.experts is not None else ()) != ranks) or (
                (m.residual.A.shape[0] if m.residual is not None else 0) != code_width) or (
                (m.residual.norm_eps if m.residual is not None else None) != norm_eps) or (
                m.res_domains != first.res_domains) or (
                (m.router is None) != (first.router is None)):
            raise ValueError("fused linears must share their input width and expert layout")
        if m.router is not None and m.router.shape[0] != len(ranks):
            raise ValueError(f"router rows {m.router.shape[0]} != gated experts {len(ranks)}")
        if m.res_domains and m.experts is not None and m.residual is None:
            raise ValueError("MoDULA-Res domain experts need the universal expert (residual)")
    with torch.no_grad():
        rows: list[Tensor] = []
        outs: list[Tensor] = []
        if base_fused:
            rows += [m.weight for m in members]
        for m in members:
            if m.residual is not None:
                rows.append(m.residual.A * m.residual.scaling)  # the universal code
            elif m.experts is not None:
                rows.append(m.experts.A)
            parts = [m.residual.B] if m.residual is not None else []
            if m.experts is not None:
                scale = torch.repeat_interleave(
                    m.experts.scale_vector(m.experts.B),
                    torch.tensor(m.experts.ranks, device=m.experts.B.device))
                parts.append(m.experts.B * scale)
            outs.append(torch.cat(parts, 1).t().contiguous())
        rows += [m.router for m in members if m.router is not None]
        width = sum(r.shape[0] for r in rows)
        if width % ALIGN:
            rows.append(rows[0].new_zeros(ALIGN - width % ALIGN, rows[0].shape[1]))
        W = torch.cat(rows, 0).contiguous()
        bias = None
        if base_fused and any(m.bias is not None for m in members):
            bias = W.new_zeros(W.shape[0])
            at = 0
            for m in members:
                d = m.weight.shape[0]
                if m.bias is not None:
                    bias[at:at + d] = m.bias
                at += d
        C_t = None
        if first.res_domains and ranks:  # A_i h = (A_i B*) code
            C_t = torch.stack([(m.experts.A @ m.residual.B).t() for m in members]).contiguous()
        gram = out_size = None
        if norm_eps is not None and ranks:
            gram = torch.stack([residual_gram(m.residual.B) for m in members])
            out_size = torch.tensor([[float(m.residual.B.shape[0])] for m in members],
                                    dtype=torch.float64, device=W.device)
    return FusedLinears(
        W_t=W.t(), bias=bias, out_features=tuple(_d_out(m) for m in members),
        base_fused=base_fused, code_width=code_width, ranks=tuple(ranks),
        W_out_t=tuple(outs), C_t=C_t, slope=negative_slope if first.res_domains and ranks else None,
        norm_eps=norm_eps if ranks else None, gram=gram,
        out_size=out_size, routed=first.router is not None,
    )


def _d_in(m: FusedMember) -> int:
    if m.weight is not None:
        return m.weight.shape[1]
    if m.residual is not None:
        return m.residual.A.shape[1]
    return m.experts.A.shape[1]


def _d_out(m: FusedMember) -> int:
    if m.residual is not None:
        return m.residual.B.shape[0]
    return m.experts.B.shape[0]


GatesFn = Callable[[Tensor], Tensor]


def fused_forward(
    f: FusedLinears,
    x: Tensor,
    lead: tuple[int, ...],
    gates: GatesFn | None,
    base_out: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """Every member's output for ``x`` (T, d_in), shaped (*lead, d_out_j); T = prod(lead),
    ``lead[0]`` rows of ``lead[1:]`` tokens each.

    ``gates(logits)`` maps the router logits (rows, S, m, n_gates) (None without a router) to
    the gates, shaped (rows, S', m', n_gates) with S' in {1, S} and m' in {1, m}. ``base_out``:
    the members' ``W0 x`` (T, d_out_j) when the base is not fused; the experts are added into
    them in place. Returns the outputs (views of one result when the base is fused) and the
    gates used (None without gated experts). Views are taken with ``as_strided`` straight from
    the result, one op each: at decode sizes the ops, not the FLOPs, are the cost."""
    T = x.shape[0]
    Z = torch.addmm(f.bias, x, f.W_t) if f.bias is not None else torch.mm(x, f.W_t)
    W = Z.shape[1]
    m, block = f.members, f.block
    start = f.base_width
    rows = lead[0] if lead else 1
    S = T // rows
    used = None
    K, K_width, K_stride, K_at = Z, block, W, start  # what the expands read, per member
    if f.ranks:
        n = f.n_gates
        r = f.ranks[0]
        uniform = all(k == r for k in f.ranks)
        end = start + m * block
        logits = Z.as_strided((rows, S, m, n), (S * W, W, n, 1), end) if f.routed else None
        used = gates(logits)
        if f.C_t is not None:  # Res: the domain shrink from the codes, member-major
            code = Z.as_strided((m, T, block), (block, W, 1), start)
            P = torch.bmm(code, f.C_t)  # (m, T, R)
            if f.norm_eps is not None:
                P.mul_(_inverse_rms(f, code))
            F.leaky_relu_(P, f.slope)
            g = used.permute(2, 0, 1, 3)  # (m', rows, S', n)
            if uniform:
                P.view(m, rows, S, n, r).mul_(g.unsqueeze(-1))
            else:
                P.view(m, rows, S, -1).mul_(_per_column(g, f.ranks))
            K = torch.cat([code, P], 2)  # (m, T, r* + R)
            K_width = K.shape[2]
            K_stride, K_at = K_width, 0
        else:  # Flan, MoLoRA: the shrink is in the result; gate it in place
            if uniform:
                shrink = Z.as_strided((rows, S, m, n, r), (S * W, W, block, r, 1), start)
                shrink.mul_(used.unsqueeze(-1))
            else:
                shrink = Z.as_strided((rows, S, m, block), (S * W, W, block, 1), start)
                shrink.mul_(_per_column(used, f.ranks))
    strides = [W] * (len(lead) + 1)
    strides[-1] = 1
    for i in range(len(lead) - 2, -1, -1):
        strides[i] = strides[i + 1] * lead[i + 1]
    outs = []
    at = 0
    for j, d in enumerate(f.out_features):
        if K is Z:
            blk = Z.as_strided((T, K_width), (K_stride, 1), K_at + j * block)
        else:
            blk = K[j]
        if f.base_fused:
            Z.as_strided((T, d), (W, 1), at).addmm_(blk, f.W_out_t[j])
            outs.append(Z.as_strided((*lead, d), strides, at))
        else:
            outs.append(base_out[j].addmm_(blk, f.W_out_t[j]).view(*lead, d))
        at += d
    return outs, used


def _per_column(gates: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """Gates (..., n) repeated over each expert's rank (..., sum r_i)."""
    return torch.repeat_interleave(gates, torch.tensor(ranks, device=gates.device), -1)


def _inverse_rms(f: FusedLinears, code: Tensor) -> Tensor:
    """Per member and token, 1 / sqrt(mean(h^2) + eps) with h = B* code: from the Gram matrix
    of B* in float64 (as :func:`modula.kernels.types.residual_feed`). ``code`` (m, T, r*);
    returns (m, T, 1)."""
    c = code.double()
    sq = (torch.bmm(c, f.gram) * c).sum(-1, keepdim=True) / f.out_size.unsqueeze(-1)
    return torch.rsqrt(sq.clamp_min(0) + f.norm_eps).to(code.dtype)
