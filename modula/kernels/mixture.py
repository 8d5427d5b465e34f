"""The expert mixture of one adapted layer: one entry point, three interchangeable backends.

Every adapted layer computes ``y = W0 x + delta`` where ``delta`` mixes LoRA experts (docs/method.md).
``expert_mixture`` computes ``delta`` (or adds it into ``W0 x`` in place) with

- ``reference``: the formula with a loop over experts, the oracle for tests;
- ``stacked``: all experts' ``A`` stacked into one matrix, two GEMMs, the CPU default;
- ``triton``: fused shrink/expand kernels, the default on CUDA.

The kernels know nothing of modules, HF or Ray: they take tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import reference_mixture
from .stacked import stacked_mixture
from .triton_kernels import interpreting, triton_mixture
from .types import ExpertStack, Residual

__all__ = ["BACKENDS", "expert_mixture", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "reference", "stacked", "triton")


def triton_available() -> bool:
    """Triton kernels can run: a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def _on_cuda(x: Tensor) -> bool:
    """Whether ``x`` lives on a CUDA device: the one question ``auto`` asks of the hardware
    (the tests answer it on a CPU-only machine, and nothing else)."""
    return x.is_cuda


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: Tensor) -> str:
    """``auto`` means Triton on CUDA tensors when Triton is installed, ``stacked`` anywhere
    else (CPU tensors, or no Triton)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} (allowed: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    return "triton" if _on_cuda(x) and _triton_importable() else "stacked"


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
    logits, which saves a pass over ``x`` forward and backward. The stacked backend
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
        delta = reference_mixture(x, experts, gates, expert_ids, residual, negative_slope)
        return delta if out is None else out.add_(delta.view(out.shape))
    if backend == "stacked":
        return stacked_mixture(x, experts, gates, expert_ids, residual, negative_slope, out, shrunk)
    return triton_mixture(x, experts, gates, expert_ids, residual, negative_slope, out)
