"""The paper's formula with a loop over experts: readable, slow, the oracle for the tests.

This is how the MoLoRA and LoRAMoE reference codes compute a mixture: one small GEMM pair per
expert, each result scaled by its gate and summed into a full-width output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import ExpertStack, Residual

__all__ = ["reference_mixture"]


def reference_mixture(
    x: Tensor,
    experts: ExpertStack | None,
    gates: Tensor | None,
    expert_ids: Tensor | None,
    residual: Residual | None,
    negative_slope: float,
) -> Tensor:
    """``delta`` of shape (..., d_out); see ``expert_mixture`` for the arguments."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    E = experts.n_experts if experts is not None else 0

    # the weight of every expert for every token
    if expert_ids is not None:
        per_token = expert_ids.repeat_interleave(T // expert_ids.shape[0])
        weights = F.one_hot(per_token, E).to(x.dtype)
    elif gates is not None:
        weights = gates.reshape(T, E)
    else:
        weights = torch.ones(T, E, dtype=x.dtype, device=x.device)

    if residual is not None:
        h = residual.scaling * ((x2 @ residual.A.t()) @ residual.B.t())
        delta = h
        expert_input = h
        if residual.norm_eps is not None:  # the rms input option: h / RMS(h), per token
            expert_input = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + residual.norm_eps)
    else:
        delta = None
        expert_input = x2

    for i in range(E):
        A_i, B_i = experts.expert(i)
        a = expert_input @ A_i.t()
        if residual is not None:
            a = F.leaky_relu(a, negative_slope)
        term = weights[:, i : i + 1] * experts.scaling[i] * (a @ B_i.t())
        delta = term if delta is None else delta + term
    return delta.reshape(*lead, -1)
