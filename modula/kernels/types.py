"""The values the kernels exchange: a layer's experts stacked (:class:`ExpertStack`) and
MoDULA-Res's universal expert (:class:`Residual`). The backends and the dispatcher
(:mod:`modula.kernels.mixture`) all import these from here, never from each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ExpertStack", "Residual", "residual_feed", "residual_gram", "stack_experts"]


class Residual(NamedTuple):
    """MoDULA-Res's universal expert: ``h = scaling * B A x`` is added ungated and the domain
    experts read ``h`` (through LeakyReLU) instead of ``x``; with ``norm_eps`` they read
    ``h / sqrt(mean(h^2) + norm_eps)`` per token instead (the ``rms`` input option)."""

    A: Tensor  # (r*, d_in)
    B: Tensor  # (d_out, r*)
    scaling: float
    norm_eps: float | None = None


def residual_feed(code: Tensor, residual: Residual, gram: Tensor | None = None) -> Tensor:
    """What the domain experts' shrink multiplies by ``A_i B*``: the universal code
    ``code = scaling * A* x`` (h = B* code), divided per token by RMS(h) when the residual
    normalises. ``||h||^2 = code^T (B*^T B*) code``, so RMS(h) comes from the r* x r* Gram
    matrix (``gram``, computed if not given) without forming h."""
    if residual.norm_eps is None:
        return code
    B = residual.B
    # float64: the quadratic form cancels where h is small next to ||code|| ||B*||, and it is
    # cheap (T x r*^2), so it costs nothing to get it as exact as the direct mean(h^2)
    G = gram if gram is not None else residual_gram(B)
    c = code.double()
    sq = ((c @ G) * c).sum(-1, keepdim=True) / B.shape[0]
    return code * torch.rsqrt(sq.clamp_min(0) + residual.norm_eps).to(code.dtype)


def residual_gram(B: Tensor) -> Tensor:
    """``B*^T B*`` in float64, for :func:`residual_feed`."""
    return B.t().double() @ B.double()


@dataclass(frozen=True, eq=False)
class ExpertStack:
    """A layer's experts stacked row-wise, so a backend runs one GEMM per side instead of one
    pair per expert. Expert ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of ``A`` and the same
    columns of ``B``; ranks may differ (MoDULA-Flan mixes the rank-16 universal expert with
    rank-8 domain experts)."""

    A: Tensor  # (R, d_e): d_e = d_in, or d_out for Res domain experts (they read h)
    B: Tensor  # (d_out, R)
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != len(self.scaling) or not self.ranks:
            raise ValueError("an ExpertStack needs one rank and one scaling per expert (>= 1)")
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError("ExpertStack.A must be (R, d_in) and B (d_out, R)")
        if self.A.shape[0] != sum(self.ranks) or self.B.shape[1] != sum(self.ranks):
            raise ValueError(
                f"stacked A {tuple(self.A.shape)} / B {tuple(self.B.shape)} do not hold "
                f"ranks {self.ranks} (total {sum(self.ranks)})"
            )

    @property
    def n_experts(self) -> int:
        return len(self.ranks)

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for r in self.ranks:
            out.append(out[-1] + r)
        return tuple(out)

    @property
    def uniform_rank(self) -> int | None:
        return self.ranks[0] if len(set(self.ranks)) == 1 else None

    def expert(self, i: int) -> tuple[Tensor, Tensor]:
        """Expert ``i``'s ``(A_i, B_i)`` as views of the stack."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.A[lo:hi], self.B[:, lo:hi]

    def derived(self, key: tuple, make, *others: Tensor):
        """``make()``, memoised on this stack while no gradient can flow through it or through
        ``others`` (inference, frozen experts): a layer caches its stack between forwards, so
        matrices built from the weights are built once. ``key`` must identify ``others``."""
        tensors = (self.A, self.B, *others)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return make()
        full = (*key, *((id(t), t.data_ptr(), t._version) for t in others))
        cache = self.__dict__.setdefault("_derived", {})
        if full not in cache:
            cache[full] = make()
        return cache[full]

    def padded(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """``A`` as (E, rank, d_e) and ``B`` as (E, d_out, rank): lets one expert per row gather
        its weights with a single index. Lower ranks are zero-padded; an expert of higher rank
        is cut, so ``rank`` must cover every expert that will be gathered (default: all)."""
        E = self.n_experts
        rank = rank or max(self.ranks)
        if self.uniform_rank == rank:
            return self.A.view(E, rank, -1), self.B.view(self.out_features, E, rank).permute(1, 0, 2)
        return self.derived(("padded", rank), lambda: self._pad(rank))

    def _pad(self, rank: int) -> tuple[Tensor, Tensor]:
        As, Bs = [], []
        for i in range(self.n_experts):
            a, b = self.expert(i)
            a, b = a[:rank], b[:, :rank]
            pad = rank - a.shape[0]
            As.append(F.pad(a, (0, 0, 0, pad)))
            Bs.append(F.pad(b, (0, pad)))
        return torch.stack(As), torch.stack(Bs)

    def scale_vector(self, like: Tensor) -> Tensor:
        """The per-expert LoRA scalings as a tensor on ``like``'s device and dtype."""
        return torch.tensor(self.scaling, dtype=like.dtype, device=like.device)

    def detach(self) -> ExpertStack:
        return ExpertStack(self.A.detach(), self.B.detach(), self.ranks, self.scaling)


def stack_experts(
    A: Sequence[Tensor], B: Sequence[Tensor], scaling: float | Sequence[float]
) -> ExpertStack:
    """Stack per-expert ``A_i (r_i, d_e)`` / ``B_i (d_out, r_i)``. Differentiable: gradients
    reach the per-expert tensors, so each expert stays its own parameter (own freezing, own
    file) while the kernels see one matrix."""
    if len(A) != len(B) or not A:
        raise ValueError(f"need the same number (>= 1) of A and B matrices, got {len(A)} and {len(B)}")
    scales = (
        tuple(float(s) for s in scaling)
        if isinstance(scaling, Sequence)
        else (float(scaling),) * len(A)
    )
    if len(scales) != len(A):
        raise ValueError(f"{len(scales)} scalings for {len(A)} experts")
    ranks = []
    for i, (a, b) in enumerate(zip(A, B, strict=True)):
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"expert {i}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair "
                "(A is (r, d_in), B is (d_out, r))"
            )
        ranks.append(a.shape[0])
    A_cat = A[0] if len(A) == 1 else torch.cat(list(A), 0)
    B_cat = B[0] if len(B) == 1 else torch.cat(list(B), 1)
    return ExpertStack(A_cat, B_cat, tuple(ranks), scales)
