"""The inference representation of a MoDULA model: fused, derived once per set of weights.

``ModulaModel.prepare_inference`` groups the adapted linears of each block that read the same
input (``q_proj``/``k_proj``/``v_proj``; ``gate_proj``/``up_proj``), derives each group's fused
matrices once (:func:`modula.kernels.fused.fuse_linears`) and hands every layer its group.
A layer's forward then runs the group once for the first member called with an input and
returns the others' outputs from the group's stash when they are called with the same tensor.

The per-row routing inputs of a call (pins, fixed weights, masks, a forced domain) become one
:class:`RoutingPlan` per call, built by the first layer and shared by all: per row, the gates
it takes without the router (one-hot for a pinned row, the given weights for a fixed row, zeros
for a Res row forced onto the universal expert) and whether any row still needs the router.
A batch whose every row has its weights (pinned, or fixed by a request-level classifier) skips
the softmax altogether.

The representation is frozen: whatever changes weights through the model (a training stage,
loading experts, adding or removing a domain) releases it, and the model falls back to the
general path until ``prepare_inference`` runs again. Weights edited in place by hand need a new
``prepare_inference`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modula.kernels.fused import FusedLinears, FusedMember, fuse_linears, fused_forward
from modula.kernels.types import ExpertStack, Residual

from .layer import UNIVERSAL, ModulaLinear

__all__ = ["FUSED_SIBLINGS", "PreparedGroup", "RoutingPlan", "prepare_groups", "release_groups"]

# adapted linears of one block that read the same input, by their names in the parent module
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class RoutingPlan:
    """The per-row part of one call's routing, shared by every layer.

    ``override``: (rows, 1, 1, n_gates) gates of the rows that do not follow the router;
    ``override_rows``: (rows, 1, 1, 1) which rows those are (None: all of them, when
    ``router`` is False; or none, when ``override`` is None); ``mask``: (rows, 1, 1, n_gates)
    the columns the router may use."""

    rows: int
    router: bool
    override: Tensor | None
    override_rows: Tensor | None
    mask: Tensor | None


def routing_plan(layer: ModulaLinear, rows: int, dim: int, device: torch.device,
                 dtype: torch.dtype) -> RoutingPlan:
    """The plan of the current call for an input of ``rows`` rows (cached on the state)."""
    st = layer._state
    key = (rows, dim, device, dtype)
    plan = st.plans.get(key)
    if plan is not None:
        return plan
    n = layer.n_gates
    ids = layer._pins(rows, dim, device)
    fixed = None
    if st.row_fixed is not None:
        fixed = _rows(st.row_fixed.to(device), rows)
    free = torch.ones(rows, dtype=torch.bool, device=device)
    override = torch.zeros(rows, n, dtype=dtype, device=device)
    if fixed is not None:
        weights = _rows(st.row_weights.to(device=device, dtype=dtype), rows)
        override = torch.where(fixed[:, None], weights, override)
        free &= ~fixed
    if ids is not None:
        pinned = ids >= 0
        one_hot = F.one_hot(ids.clamp(min=0), n).to(dtype)
        override = torch.where(pinned[:, None], one_hot, override)
        free &= ~pinned
    router = bool(free.any()) and st.forced != UNIVERSAL
    mask = None
    if router and st.row_mask is not None:
        mask = _rows(st.row_mask.to(device), rows).view(rows, 1, 1, n)
    any_override = not bool(free.all()) or st.forced == UNIVERSAL
    plan = RoutingPlan(
        rows=rows, router=router,
        override=override.view(rows, 1, 1, n) if any_override or not router else None,
        override_rows=(~free).view(rows, 1, 1, 1) if router and any_override else None,
        mask=mask,
    )
    st.plans[key] = plan
    return plan


def _rows(t: Tensor, rows: int) -> Tensor:
    """A per-row tensor repeated for the input's rows (beams, returned sequences)."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0] != 0:
        raise ValueError(f"per-row routing has {t.shape[0]} rows but the layer input has {rows}")
    return t.repeat_interleave(rows // t.shape[0], 0)


class PreparedGroup:
    """Adapted linears reading one input, with their fused inference matrices."""

    def __init__(self, layers: list[ModulaLinear], fused: FusedLinears):
        self.layers = layers
        self.fused = fused
        # the last input's outputs not yet taken: (x, x version, state generation, per member)
        self._stash: tuple[Tensor, int, int, list[Any]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.fused.dtype

    def usable(self, x: Tensor) -> bool:
        """Whether the fused path applies to this call (else the layer's general path)."""
        if x.dtype != self.fused.dtype or x.device != self.fused.W_t.device:
            return False
        if torch.is_grad_enabled():
            # a graph would have to reach the experts or x: the general path builds it
            return not x.requires_grad and not any(
                p.requires_grad for lyr in self.layers for p in lyr.parameters())
        return True

    def forward(self, index: int, x: Tensor) -> Tensor:
        layer = self.layers[index]
        st = layer._state
        stash = self._stash
        # traced by torch.compile (the compiled decode step, modula.model.compiled): one graph
        # holds the siblings' calls, so identity is enough; reading the version (unsupported)
        # or the generation (a new value per call) would break or respecialise the graph
        traced = _traced()
        if stash is not None and stash[0] is x and stash[3][index] is not None and (
                traced or (stash[1] == _version(x) and stash[2] == st.generation)):
            y, gates = stash[3][index]
            stash[3][index] = None
            if all(s is None for s in stash[3]):
                self._stash = None
            self._capture(layer, gates)
            return y
        self._stash = None
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, x.shape[-1])
        rows = lead[0] if lead else 1
        f = self.fused
        gates_fn = None
        if f.ranks:
            plan = st.step_plan if traced and st.step_plan is not None else routing_plan(
                layer, rows, x.dim(), x.device, f.dtype)
            gates_fn = _gates_fn(layer, plan) if plan.router else _constant(plan.override)
        base = None if f.base_fused else [lyr.base_layer(x2) for lyr in self.layers]
        outs, used = fused_forward(f, x2, lead, gates_fn, base)
        results = []
        for j, y in enumerate(outs):
            g = None
            if used is not None and st.capture is not None:
                g = used[:, :, j if used.shape[2] > 1 else 0]
                g = g.expand(rows, x2.shape[0] // rows, f.n_gates).reshape(*lead, f.n_gates)
            results.append((y, g))
        if len(results) > 1:
            taken = list(results)
            taken[index] = None
            # a stash left by a traced call is never taken by an eager one (version None)
            self._stash = (x, None, None, taken) if traced else (
                x, _version(x), st.generation, taken)
        y, g = results[index]
        self._capture(layer, g)
        return y

    @staticmethod
    def _capture(layer: ModulaLinear, gates: Tensor | None) -> None:
        st = layer._state
        if st.capture is None or gates is None or layer.router is None:
            return
        g = gates.detach()
        st.capture.setdefault(layer.name, []).append(g.unsqueeze(0) if g.dim() == 2 else g)


# whether torch.compile is tracing this call (a name of its own: the tests run the traced
# branch eager)
_traced = torch.compiler.is_compiling


def _version(x: Tensor) -> int:
    """The in-place version of ``x`` (inference tensors keep none: -1)."""
    return -1 if x.is_inference() else x._version


def _constant(gates: Tensor):
    return lambda logits: gates


def _gates_fn(layer: ModulaLinear, plan: RoutingPlan):
    """The gates of one call from the router logits (rows, S, m, n), as ModulaLinear._gates
    computes them, with the plan's rows put in."""
    n = layer.n_gates
    temperature, k = layer.temperature, layer.top_k

    def gates(logits: Tensor) -> Tensor:
        dtype = logits.dtype
        lg = logits.float()
        if temperature != 1.0:
            lg = lg / temperature
        if plan.mask is not None:
            lg = lg.masked_fill(~plan.mask, float("-inf"))
        if k is not None and k < n:
            top, idx = lg.topk(k, dim=-1)
            g = torch.zeros_like(lg).scatter(-1, idx, torch.softmax(top, -1))
        else:
            g = torch.softmax(lg, -1)
        if plan.mask is not None:
            g = g.nan_to_num(0.0)
        g = g.to(dtype)
        if plan.override_rows is not None:
            g = torch.where(plan.override_rows, plan.override, g)
        return g

    return gates


def _member(layer: ModulaLinear, fuse_base: bool) -> FusedMember:
    base = layer.base_layer
    residual = None
    if layer.universal is not None and layer.variant in ("res", "lora"):
        u = layer.universal
        residual = Residual(u.A.detach(), u.B.detach(), layer.universal_scaling,
                            layer.res_norm_eps if layer.variant == "res" else None)
    experts = None
    if layer.variant != "lora":
        modules = ([layer.universal] if layer.variant == "flan" else []) + list(
            layer.experts.values())
        if modules:
            scal = [layer.universal_scaling if m is layer.universal else layer.domain_scaling
                    for m in modules]
            A = torch.cat([m.A.detach() for m in modules], 0)
            B = torch.cat([m.B.detach() for m in modules], 1)
            experts = ExpertStack(A, B, tuple(m.rank for m in modules), tuple(scal))
    router = layer.router.weight.detach() if experts is not None else None
    return FusedMember(
        weight=base.weight.detach() if fuse_base else None,
        bias=base.bias.detach() if fuse_base and base.bias is not None else None,
        residual=residual, experts=experts, router=router,
        res_domains=layer.variant == "res")


def _base_fusable(layer: ModulaLinear) -> bool:
    """The base can share the GEMM: a plain nn.Linear of the adapters' dtype and device."""
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return False
    ref = layer.router.weight if layer.router is not None else layer.universal.A
    return base.weight.dtype == ref.dtype and base.weight.device == ref.device


def _signature(layer: ModulaLinear) -> tuple:
    ref = layer.router.weight if layer.router is not None else layer.universal.A
    return (layer.in_features, ref.dtype, ref.device, _base_fusable(layer),
            layer.base_layer.bias is not None if _base_fusable(layer) else None)


def prepare_groups(layers: dict[str, ModulaLinear], fuse_siblings: bool = True
                   ) -> list[PreparedGroup]:
    """Fuse ``layers`` (path -> layer) into groups and hand each layer its group. With a fused
    base, each base weight becomes a view of its group's matrix (no second copy)."""
    taken: set[str] = set()
    groups: list[PreparedGroup] = []
    for path in layers:
        if path in taken:
            continue
        members = [path]
        parent, _, child = path.rpartition(".")
        for names in FUSED_SIBLINGS if fuse_siblings else ():
            if child in names:
                paths = [f"{parent}.{n}" if parent else n for n in names]
                found = [p for p in paths if p in layers and p not in taken]
                if len(found) > 1 and len({_signature(layers[p]) for p in found}) == 1:
                    members = found
        group_layers = [layers[p] for p in members]
        fuse_base = _base_fusable(group_layers[0])
        with torch.no_grad():
            fused = fuse_linears([_member(lyr, fuse_base) for lyr in group_layers],
                                 group_layers[0].negative_slope)
        group = PreparedGroup(group_layers, fused)
        if fuse_base:
            W = fused.W_t.t()
            at = 0
            for lyr in group_layers:
                d = lyr.base_layer.weight.shape[0]
                lyr.base_layer.weight.data = W[at:at + d]
                at += d
        for j, lyr in enumerate(group_layers):
            lyr._prepared = (group, j)
        taken.update(members)
        groups.append(group)
    return groups


def release_groups(layers: dict[str, ModulaLinear]) -> None:
    """Drop every layer's group; base weights that are views of a group's matrix get their
    own storage back (so the model saves and trains as before)."""
    for layer in layers.values():
        if layer._prepared is None:
            continue
        group, _ = layer._prepared
        layer._prepared = None
        group._stash = None
        w = layer.base_layer.weight
        if group.fused.base_fused and w.data._base is not None:
            w.data = w.data.clone()
