"""The expert mixture of one adapted layer: one entry point, three interchangeable backends.

Every adapted layer computes ``y = W0 x + delta`` where ``delta`` mixes LoRA experts (PAPER.md).
``expert_mixture`` computes ``delta`` (or adds it into ``W0 x`` in place) with

- ``reference``: the formula with a loop over experts, the oracle for tests;
- ``stacked``: all experts' ``A`` stacked into one matrix, two GEMMs, the CPU default;
- ``triton``: fused shrink/expand kernels, the default on CUDA.

The kernels know nothing of modules, HF or Ray: they take tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "ExpertStack",
    "Residual",
    "expert_mixture",
    "resolve_backend",
    "stack_experts",
    "triton_available",
]

BACKENDS = ("auto", "reference", "stacked", "triton")


class Residual(NamedTuple):
    """MoDULA-Res's universal expert: ``h = scaling * B A x`` is added ungated and the domain
    experts read ``h`` (through LeakyReLU) instead of ``x``."""

    A: Tensor  # (r*, d_in)
    B: Tensor  # (d_out, r*)
    scaling: float


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


def triton_available() -> bool:
    """Triton kernels can run: a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from .triton_kernels import interpreting

    return torch.cuda.is_available() or interpreting()


def resolve_backend(backend: str, x: Tensor) -> str:
    """``auto`` means Triton on CUDA tensors, ``stacked`` anywhere else."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} (allowed: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if x.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "stacked"
        return "triton"
    return "stacked"


def expert_mixture(
    x: Tensor,
    experts: ExpertStack | None,
    *,
    gates: Tensor | None = None,
    expert_ids: Tensor | None = None,
    residual: Residual | None = None,
    negative_slope: float = 0.01,
    shrunk: Tensor | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """The adapter part of a MoDULA layer, ``delta``; added into ``out`` in place if given.

    ``x`` is (..., d_in). Without ``residual`` (LoRA, MoLoRA, Flan)::

        delta = sum_i w_i * s_i * B_i A_i x

    With ``residual`` (MoDULA-Res)::

        h = s* B* A* x;   delta = h + sum_i w_i * s_i * B_i LeakyReLU(A_i h)

    The expert weights ``w`` come from (in this order of precedence):

    - ``expert_ids``: one expert per row of ``x`` (a LongTensor of length ``x.shape[0]``), the
      serving case of requests pinned to a domain. ``-1`` marks a row that takes its weights
      from ``gates`` instead (``gates`` is then required);
    - ``gates``: (..., E) per-token weights (a router's softmax; zeros allowed, e.g. top-k);
    - neither: every expert with weight 1 (a single expert trained alone).

    ``shrunk``: the first GEMM's result if the caller already has it, ``x A_cat^T`` (..., R) or,
    with ``residual``, ``A* x`` (..., r*): a layer computes it in the same GEMM as its router
    logits, which saves a pass over ``x`` forward and backward (DESIGN.md). The stacked backend
    uses it on its dense path; the others recompute.

    ``out`` (..., d_out), or flat (tokens, d_out), must have ``x``'s dtype; the sum is
    accumulated into it, which spares a pass over the layer output (pass ``W0 x``; better not a
    view, or autograd copies it in backward). Returns ``out`` or the new ``delta``.
    """
    backend = resolve_backend(backend, x)
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    if experts is None and residual is None:
        raise ValueError("expert_mixture needs experts, a residual universal expert, or both")
    if residual is not None:
        if residual.A.dim() != 2 or residual.A.shape[1] != d_in:
            raise ValueError(f"residual A {tuple(residual.A.shape)} does not read d_in={d_in}")
        if residual.B.dim() != 2 or residual.B.shape[1] != residual.A.shape[0]:
            raise ValueError(
                f"residual A {tuple(residual.A.shape)} and B {tuple(residual.B.shape)} "
                "are not a LoRA pair"
            )
    d_out = residual.B.shape[0] if residual is not None else experts.out_features
    if experts is not None:
        want_in = d_out if residual is not None else d_in
        if experts.in_features != want_in or experts.out_features != d_out:
            raise ValueError(
                f"experts read {experts.in_features} and write {experts.out_features} features; "
                f"this layer needs {want_in} -> {d_out}"
                + (" (Res domain experts read the universal output h)" if residual else "")
            )
    for name, t in (("experts.A", experts.A if experts else None), ("residual.A", residual.A if residual else None)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}; cast one of them")
    if out is not None:
        tokens = math.prod(lead)
        if out.shape not in ((*lead, d_out), (tokens, d_out)) or out.dtype != x.dtype:
            raise ValueError(
                f"out must be {(*lead, d_out)} or {(tokens, d_out)} {x.dtype}, got "
                f"{tuple(out.shape)} {out.dtype}"
            )
    E = experts.n_experts if experts is not None else 0
    if shrunk is not None:
        width = residual.A.shape[0] if residual is not None else sum(experts.ranks)
        if shrunk.shape != (*lead, width):
            raise ValueError(f"shrunk must be {(*lead, width)}, got {tuple(shrunk.shape)}")
    if gates is not None:
        if experts is None:
            raise ValueError("gates given but there are no experts to weigh")
        if gates.shape[-1] != E or gates.shape[:-1] != lead:
            raise ValueError(f"gates must be {(*lead, E)}, got {tuple(gates.shape)}")
        gates = gates.to(x.dtype)
    if expert_ids is not None:
        if experts is None:
            raise ValueError("expert_ids given but there are no experts")
        if x.dim() < 2 or expert_ids.shape != (x.shape[0],):
            raise ValueError(
                f"expert_ids must hold one id per row of x ({x.shape[0] if x.dim() else 0}), "
                f"got shape {tuple(expert_ids.shape)}"
            )
        ids = expert_ids.to(device=x.device, dtype=torch.long)
        if bool(((ids < -1) | (ids >= E)).any()):
            raise ValueError(f"expert_ids must lie in [-1, {E - 1}]")
        routed = ids < 0
        if bool(routed.any()):
            if gates is None:
                raise ValueError("expert_ids has -1 (routed) rows but no gates were given")
            one_hot = F.one_hot(ids.clamp(min=0), E).to(gates.dtype)
            shape = (x.shape[0],) + (1,) * (gates.dim() - 2) + (E,)
            gates = torch.where(routed.view(shape[:-1] + (1,)), gates, one_hot.view(shape))
            expert_ids = None
        else:
            expert_ids = ids
    if x.numel() == 0:
        zero = x.new_zeros((*lead, d_out))
        return out if out is not None else zero

    if backend == "reference":
        from .reference import reference_mixture

        delta = reference_mixture(x, experts, gates, expert_ids, residual, negative_slope)
        return delta if out is None else out.add_(delta.view(out.shape))
    if backend == "stacked":
        from .stacked import stacked_mixture

        return stacked_mixture(x, experts, gates, expert_ids, residual, negative_slope, out, shrunk)
    from .triton_kernels import triton_mixture

    return triton_mixture(x, experts, gates, expert_ids, residual, negative_slope, out)
