"""Folding one expert into the base weights, where the math allows it.

``W0 + s B A`` is exact for the universal expert alone (LoRA, Flan, Res: ``W0 x + h``) and for a
forced Flan or MoLoRA domain (one-hot gates: ``W0 x + s B_i A_i x``). A Res domain expert
(LeakyReLU of h) and a routed mixture (gates depend on x) are not linear maps of x.
Single-domain serving then runs a plain HF model with no adapter cost.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .model import ModulaModel

__all__ = ["merge_into_base"]


def merge_into_base(model: ModulaModel, expert: str = "universal") -> nn.Module:
    """A new plain HF model whose weights are ``W0 + s B A`` of ``expert`` (``universal`` or a
    domain); equal to ``model`` with ``force_domain(expert)``. ``model`` is left unchanged."""
    if expert == "universal":
        if model.variant == "molora":
            raise ValueError("variant 'molora' has no universal expert")
    elif expert not in model.domains:
        raise ValueError(f"unknown expert {expert!r} (allowed: universal, {', '.join(model.domains)})")
    elif model.variant == "res":
        raise ValueError(
            "a forced MoDULA-Res domain is W0 x + h + s B_i LeakyReLU(A_i h): not linear in x, "
            "so it cannot be merged; merge 'universal' or serve the forced domain unmerged"
        )
    paths = list(model.modula_layers())
    merged = copy.deepcopy(model.base_model)
    with torch.no_grad():
        for path in paths:
            lyr = merged.get_submodule(path)
            base = lyr.base_layer
            delta = lyr.delta_weight(expert).to(base.weight.dtype)
            base.weight.add_(delta.t() if lyr.is_conv1d else delta)
            parent_name, _, child = path.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, base)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
