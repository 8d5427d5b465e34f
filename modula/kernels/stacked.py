"""The stacked expert mixture in plain torch: the CPU default, differentiable end to end.

Three strategies, picked per call:

- **dense** (router softmax over all experts): one shrink GEMM ``x A_cat^T`` (T x sum r_i),
  gates (and Res's LeakyReLU) applied per expert block, one expand GEMM accumulated into
  ``W0 x``. For MoDULA-Res associativity does the rest: ``A_i h = (A_i B*)(A* x)``,
  so the domain shrink reads the rank-r* code ``u = A* x`` through the small (sum r_i x r*)
  matrix ``A_cat B*``, and the universal and domain expands share one GEMM.
- **per row** (every row pinned to one expert, the serving case): each row gathers its expert's
  weights and one batched GEMM pair does the rest; FLOPs grow with the rank, not with E. Short
  rows (decoding) are cheaper as the dense path with one-hot gates: below about 48 tokens x
  experts per row, gathering weights costs more than computing every expert.
- **grouped** (sparse gates without gradient, e.g. top-k routing at inference, density under
  1/8): tokens are sorted by expert and each expert runs only on its tokens, so the cost grows
  with k, not with the number of experts. Above that density the dense GEMMs win on a CPU.

Costs measured on 2 AVX2 cores; see benchmarks/kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import ExpertStack, Residual, residual_feed, residual_gram

__all__ = ["stacked_mixture"]

_PER_ROW_MIN_WORK = 48  # tokens per row x experts, above which gathering weights per row pays
_GROUPED_MAX_DENSITY = 1 / 8


def stacked_mixture(
    x: Tensor,
    experts: ExpertStack | None,
    gates: Tensor | None,
    expert_ids: Tensor | None,
    residual: Residual | None,
    negative_slope: float,
    out: Tensor | None,
    shrunk: Tensor | None = None,
) -> Tensor:
    lead = x.shape[:-1]
    d_out = residual.B.shape[0] if residual is not None else experts.out_features
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    out2 = None
    if out is not None:
        out2 = out if out.dim() == 2 else out.view(T, d_out)
    if expert_ids is not None:
        rows = x.shape[0]
        per_row = T // rows
        used = torch.unique(expert_ids).tolist()
        rank = max(experts.ranks[i] for i in used)
        if per_row * sum(experts.ranks) >= _PER_ROW_MIN_WORK * rank:
            result = _per_row(x, experts, expert_ids, rank, residual, negative_slope, out)
            return out if out is not None else result.reshape(*lead, d_out)
        one_hot = F.one_hot(expert_ids.repeat_interleave(per_row), experts.n_experts).to(x.dtype)
        result = _dense(x2, experts, one_hot, residual, negative_slope, out2)
        return out if out is not None else result.view(*lead, d_out)
    g2 = gates.reshape(T, -1) if gates is not None else None
    if (
        g2 is not None
        and experts.n_experts > 1
        and not g2.requires_grad
        and int(torch.count_nonzero(g2)) < _GROUPED_MAX_DENSITY * g2.numel()
    ):
        result = _grouped(x2, experts, g2, residual, negative_slope, out2)
    else:
        s2 = shrunk.reshape(T, -1) if shrunk is not None else None
        result = _dense(x2, experts, g2, residual, negative_slope, out2, s2)
    return out if out is not None else result.view(*lead, d_out)


def _weigh(P: Tensor, experts: ExpertStack, gates: Tensor | None) -> Tensor:
    """Scale each expert's block of columns of ``P`` (T, R) by its gate and LoRA scaling."""
    same_scale = len(set(experts.scaling)) == 1
    if gates is None:
        if same_scale:
            return P * experts.scaling[0]
        cols = torch.repeat_interleave(
            experts.scale_vector(P),
            torch.tensor(experts.ranks, device=P.device),
        )
        return P * cols
    w = gates * experts.scaling[0] if same_scale else gates * experts.scale_vector(P)
    r = experts.uniform_rank
    if r is not None:
        T, E = w.shape
        return (P.view(T, E, r) * w.unsqueeze(-1)).view(T, E * r)
    cols = torch.repeat_interleave(w, torch.tensor(experts.ranks, device=P.device), dim=1)
    return P * cols


def _feed(code: Tensor, experts: ExpertStack, residual: Residual) -> Tensor:
    """The domain shrink's input (:func:`residual_feed`), the Gram matrix of ``B*`` built
    once per weights like the other derived matrices."""
    if residual.norm_eps is None:
        return code
    G = experts.derived(("res_G",), lambda: residual_gram(residual.B), residual.B)
    return residual_feed(code, residual, G)


def _expand(P: Tensor, W: Tensor, out: Tensor | None) -> Tensor:
    """``out += P W^T`` in place, or a new ``P W^T``."""
    if out is None:
        return P @ W.t()
    return out.addmm_(P, W.t())


def _dense(
    x: Tensor,
    experts: ExpertStack | None,
    gates: Tensor | None,
    residual: Residual | None,
    slope: float,
    out: Tensor | None,
    shrunk: Tensor | None = None,
) -> Tensor:
    if residual is None:
        P = shrunk if shrunk is not None else x @ experts.A.t()
        return _expand(_weigh(P, experts, gates), experts.B, out)
    code = (shrunk if shrunk is not None else x @ residual.A.t()) * residual.scaling  # h = B* code
    if experts is None:
        return _expand(code, residual.B, out)
    C = experts.derived(("res_C",), lambda: experts.A @ residual.B, residual.B)  # A_i h = C_i code
    P = _weigh(F.leaky_relu(_feed(code, experts, residual) @ C.t(), slope), experts, gates)
    W_out = experts.derived(("res_W",), lambda: torch.cat([residual.B, experts.B], 1), residual.B)
    return _expand(torch.cat([code, P], 1), W_out, out)


def _per_row(
    x: Tensor,
    experts: ExpertStack,
    ids: Tensor,
    rank: int,
    residual: Residual | None,
    slope: float,
    out: Tensor | None,
) -> Tensor:
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    T = x3.shape[0] * x3.shape[1]
    d_out = experts.out_features
    scale = experts.scale_vector(x)[ids].view(rows, 1, 1)
    A_pad, B_pad = experts.padded(rank)
    if residual is not None:
        code = (x3 @ residual.A.t()) * residual.scaling  # (rows, S, r*)
        C = experts.derived(("res_C",), lambda: experts.A @ residual.B, residual.B)
        C_rows = ExpertStack(C, experts.B, experts.ranks, experts.scaling).padded(rank)[0][ids]
        a = F.leaky_relu(torch.bmm(_feed(code, experts, residual), C_rows.transpose(1, 2)), slope)
    else:
        a = torch.bmm(x3, A_pad[ids].transpose(1, 2))  # (rows, S, r)
    a = a * scale
    B_rows = B_pad[ids].transpose(1, 2)  # (rows, r, d_out)
    if out is None or torch.is_grad_enabled():
        # (with autograd, adding a new tensor avoids an in-place op on a view of ``out``)
        result = torch.bmm(a, B_rows)
        if residual is not None:
            result.view(T, d_out).addmm_(code.reshape(T, -1), residual.B.t())
        return result if out is None else out.add_(result.view(out.shape))
    out3 = out.view(rows, -1, d_out)
    out3.baddbmm_(a, B_rows)
    if residual is not None:
        out3.view(T, d_out).addmm_(code.reshape(T, -1), residual.B.t())
    return out3


def _grouped(
    x: Tensor,
    experts: ExpertStack,
    gates: Tensor,
    residual: Residual | None,
    slope: float,
    out: Tensor | None,
) -> Tensor:
    T = x.shape[0]
    d_out = experts.out_features
    tok, exp = gates.nonzero(as_tuple=True)
    order = torch.argsort(exp, stable=True)
    tok, exp = tok[order], exp[order]
    w = gates[tok, exp]
    counts = torch.bincount(exp, minlength=experts.n_experts).tolist()
    target = out if out is not None else x.new_zeros(T, d_out)
    if residual is not None:
        code = (x @ residual.A.t()) * residual.scaling
        target.addmm_(code, residual.B.t())
        feed = _feed(code, experts, residual)
        W_in = experts.derived(("res_C",), lambda: experts.A @ residual.B, residual.B)
    else:
        feed, W_in = x, experts.A
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = tok[start : start + count]
        lo, hi = experts.offsets[e], experts.offsets[e + 1]
        a = feed.index_select(0, rows) @ W_in[lo:hi].t()
        if residual is not None:
            a = F.leaky_relu(a, slope)
        a = a * (w[start : start + count] * experts.scaling[e]).unsqueeze(1)
        target.index_add_(0, rows, a @ experts.B[:, lo:hi].t())
        start += count
    return target
