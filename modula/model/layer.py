"""The MoDULA layer: a frozen linear layer plus universal and domain LoRA experts and a router.

One ``ModulaLinear`` replaces each target linear layer. Its forward is ``W0 x + delta`` with
``delta`` from ``modula.kernels.expert_mixture`` (docs/method.md, per variant):

- ``lora``:   ``B* A* x``                                  (one adapter, the baseline)
- ``molora``: ``sum_i s_i B_i A_i x``                      (router over the domain experts)
- ``flan``:   ``sum_{i in {*, 1..n}} s_i B_i A_i x``       (the universal expert is expert 0)
- ``res``:    ``h + sum_i s_i B_i LeakyReLU(A_i h)``, ``h = B* A* x``, router reads ``x``

What runs is set model-wide through a shared ``LayerState`` (the training stage, a forced
domain, per-row pins of a serving batch, gate capture), so the HF model's own forward needs no
extra arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modula.config.schema import ModulaLayerConfig
from modula.kernels import ExpertStack, Residual, expert_mixture, stack_experts

from .targets import linear_dims

__all__ = ["UNIVERSAL", "LayerState", "LoraExpert", "ModulaLinear", "Router"]

# a forced expert id meaning "the universal expert alone" (no domain expert)
UNIVERSAL = -2
# Res domain experts reading h / sqrt(mean(h^2) + eps): small next to mean(h^2) of a trained
# universal expert, and 0 / sqrt(eps) = 0 while B* is still zero
RES_NORM_EPS = 1e-6


class LoraExpert(nn.Module):
    """One LoRA pair ``B A`` (A: r x d_in, B: d_out x r). ``B`` starts at zero so a new expert
    changes nothing until it is trained (docs/method.md)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, dtype=None, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT and nn.Linear

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class Router(nn.Module):
    """Per-layer router ``W_R`` (n_experts x d_in), no bias (docs/method.md: ``s = softmax(W_R x)``).
    Rows are in expert order; adding a domain appends a zero row (logit 0)."""

    def __init__(self, in_features: int, n_experts: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, in_features, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def add_row(self) -> None:
        w = self.weight.data
        new = torch.cat([w, w.new_zeros(1, w.shape[1])], 0)
        self.weight = nn.Parameter(new, requires_grad=self.weight.requires_grad)

    def remove_row(self, index: int) -> None:
        w = self.weight.data
        keep = [i for i in range(w.shape[0]) if i != index]
        self.weight = nn.Parameter(w[keep].clone(), requires_grad=self.weight.requires_grad)


@dataclass
class LayerState:
    """What every MoDULA layer of one model does on the next forward (shared, set by the model).

    ``path``: ``routed`` (the full mixture), ``universal`` (E* alone) or ``domain``
    (``path_domain`` alone, as in its training stage). ``forced``: a domain index, or
    ``UNIVERSAL``, pinning the routed path. Per batch row, for one call (see
    ``ModulaModel.forward``): ``row_ids``, a domain index or -1; ``row_fixed`` / ``row_weights``,
    rows whose gates are given rather than learned, and those gates (rows, n_gates);
    ``row_mask``, the gate columns the router may use per row (rows, n_gates).
    ``router_rows``: whether any row still follows the learned router. ``generation`` counts
    changes of all this (``changed``), so what a prepared model derives from it per call
    (``plans``, see :mod:`modula.model.inference`) is derived once per call.
    """

    backend: str = "auto"
    path: str = "routed"
    path_domain: int | None = None
    forced: int | None = None
    row_ids: Tensor | None = None
    rows_all_pinned: bool = False
    row_fixed: Tensor | None = None
    row_weights: Tensor | None = None
    row_mask: Tensor | None = None
    router_rows: bool = True
    capture: dict[str, list[Tensor]] | None = None
    # the router gates of the routed path, with their graph (router supervision, training)
    collect: list[Tensor] | None = None
    disabled: bool = False
    generation: int = 0
    plans: dict[Any, Any] = field(default_factory=dict)
    # the routing plan of the current compiled decode step, derived before the graph runs
    # (modula.model.compiled): the traced layers read it instead of deriving their own
    step_plan: Any = None

    def changed(self) -> None:
        """The routing of the next forward changed: forget what was derived from the old."""
        self.generation += 1
        self.plans.clear()


class ModulaLinear(nn.Module):
    """A frozen ``nn.Linear`` / GPT-2 ``Conv1D`` with MoDULA experts and a router."""

    def __init__(
        self,
        base_layer: nn.Module,
        cfg: ModulaLayerConfig,
        domains: list[str],
        state: LayerState,
        name: str,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        self.variant = cfg.variant
        self.universal_rank = cfg.universal_rank
        self.domain_rank = cfg.domain_rank
        self.universal_scaling = cfg.universal_scaling
        self.domain_scaling = cfg.domain_scaling
        self.negative_slope = cfg.leaky_relu_slope
        self.res_norm_eps = RES_NORM_EPS if cfg.res_input_norm == "rms" else None
        self.top_k = cfg.router.top_k
        self.temperature = cfg.router.temperature
        self.name = name
        self._state = state
        self._stack_cache: tuple[tuple, tuple[ExpertStack, Tensor]] | None = None
        # (group, index) once the model is prepared for inference (modula.model.inference)
        self._prepared: tuple[Any, int] | None = None
        weight = base_layer.weight
        factory = {"dtype": dtype or weight.dtype, "device": weight.device}
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.universal = (
            LoraExpert(self.in_features, self.out_features, cfg.universal_rank, **factory)
            if self.variant in ("lora", "flan", "res")
            else None
        )
        self.experts = nn.ModuleDict()
        self.router = (
            Router(self.in_features, len(domains) + (self.variant == "flan"), **factory)
            if self.variant != "lora"
            else None
        )
        for d in domains:
            self.experts[d] = self._new_expert()

    # ---- structure ---------------------------------------------------------------------

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.router.weight.dtype if self.router is not None else self.universal.A.dtype

    @property
    def domains(self) -> list[str]:
        return list(self.experts.keys())

    @property
    def n_gates(self) -> int:
        """Columns of this layer's gate tensor (Flan: universal first, then the domains)."""
        return len(self.experts) + (self.variant == "flan") if self.router is not None else 0

    def _new_expert(self) -> LoraExpert:
        # Res domain experts read h (d_out wide), the others read x
        d_e = self.out_features if self.variant == "res" else self.in_features
        ref = self.router.weight
        return LoraExpert(d_e, self.out_features, self.domain_rank, dtype=ref.dtype, device=ref.device)

    def add_expert(self, name: str) -> None:
        self.experts[name] = self._new_expert()
        self.router.add_row()

    def remove_expert(self, name: str) -> None:
        index = self.domains.index(name)
        del self.experts[name]
        self.router.remove_row(index + (self.variant == "flan"))

    def expert_module(self, name: str) -> LoraExpert:
        """``"universal"`` or a domain name."""
        if name == "universal":
            if self.universal is None:
                raise KeyError(f"variant {self.variant!r} has no universal expert")
            return self.universal
        return self.experts[name]

    def delta_weight(self, name: str) -> Tensor:
        """``s B A`` of one expert as a (d_out, d_in) matrix, for merging into ``W0``."""
        if self.variant == "res" and name != "universal":
            raise ValueError("a MoDULA-Res domain expert is not linear in x (LeakyReLU of h)")
        e = self.expert_module(name)
        s = self.universal_scaling if name == "universal" else self.domain_scaling
        return s * (e.B @ e.A)

    # ---- routing -----------------------------------------------------------------------

    def route(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Router gates (..., n_gates): softmax(W_R x / T) over the columns ``mask`` allows
        (all by default), optionally top-k, renormalised. A row that allows no column gets
        zero gates (Res: the universal expert alone)."""
        return self._gates(F.linear(x, self.router.weight), mask)

    def _gates(self, logits: Tensor, mask: Tensor | None = None) -> Tensor:
        dtype = logits.dtype
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        k = self.top_k
        if k is not None and k < logits.shape[-1]:
            top, idx = logits.topk(k, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
        else:
            gates = torch.softmax(logits, -1)
        if mask is not None:
            gates = gates.nan_to_num(0.0)  # rows with every column masked out
        return gates.to(dtype)

    def _row_view(self, t: Tensor, lead: tuple[int, ...]) -> Tensor:
        """A per-row tensor (rows, ...) broadcast over the tokens of ``lead`` (rows, S, ...);
        rows repeat when the input has more (beams, returned sequences)."""
        rows = lead[0] if lead else 1
        if t.shape[0] != rows:
            if rows % t.shape[0] != 0:
                raise ValueError(f"per-row routing has {t.shape[0]} rows but the layer input "
                                 f"has {rows}")
            t = t.repeat_interleave(rows // t.shape[0], 0)
        return t.view(t.shape[0], *([1] * (len(lead) - 1)), *t.shape[1:])

    def _full_stack(self) -> tuple[ExpertStack, Tensor]:
        """All experts in gate order, stacked, and the matrix that shrinks ``x`` for them and
        for the router in one GEMM (``[A_cat; W_R]``, Res: ``[A*; W_R]``). Cached while none of
        it can change (inference, router stage), keyed by each tensor's identity, storage and
        version."""
        modules = ([self.universal] if self.variant == "flan" else []) + list(self.experts.values())
        params = [p for m in modules for p in (m.A, m.B)] + [self.router.weight]
        if self.variant == "res":
            params += [self.universal.A]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_stack(modules)
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        if self._stack_cache is None or self._stack_cache[0] != key:
            with torch.no_grad():
                self._stack_cache = (key, self._build_stack(modules))
        return self._stack_cache[1]

    def _build_stack(self, modules: list[LoraExpert]) -> tuple[ExpertStack, Tensor]:
        scalings = [self.universal_scaling if m is self.universal else self.domain_scaling for m in modules]
        stack = stack_experts([m.A for m in modules], [m.B for m in modules], scalings)
        first = self.universal.A if self.variant == "res" else stack.A
        return stack, torch.cat([first, self.router.weight], 0)

    def _single(self, expert: LoraExpert, scaling: float) -> ExpertStack:
        return ExpertStack(expert.A, expert.B, (expert.rank,), (scaling,))

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        st = self._state
        prepared = self._prepared
        if (prepared is not None and not st.disabled and st.path == "routed"
                and st.backend in ("auto", "stacked") and not self.training and not args
                and not kwargs and prepared[0].usable(x)):
            return prepared[0].forward(prepared[1], x)
        lead = x.shape[:-1]
        # the base runs on the flat input so its output is a plain tensor: accumulating the
        # experts into it in place then costs no copy in backward (a view would)
        result = self.base_layer(x.reshape(-1, x.shape[-1]), *args, **kwargs)
        if st.disabled:
            return result.view(*lead, -1)
        dtype = self.adapter_dtype
        if torch.is_autocast_enabled(x.device.type):
            # mixed precision: the adapters compute in the autocast dtype whatever the backend
            # (the Triton kernels are no autocast op); their float32 masters get float32 grads
            dtype = torch.get_autocast_dtype(x.device.type)
        xa = x if x.dtype == dtype else x.to(dtype)
        dropout_active = self.training and not isinstance(self.dropout, nn.Identity)
        z = self.dropout(xa)
        residual = (
            Residual(self.universal.A.to(dtype), self.universal.B.to(dtype),
                     self.universal_scaling, self.res_norm_eps)
            if self.variant == "res"
            else None
        )
        experts: ExpertStack | None = None
        gates: Tensor | None = None
        ids: Tensor | None = None
        shrunk: Tensor | None = None
        effective: Tensor | None = None  # the weights each expert gets, for gate capture
        capture = st.capture is not None and self.router is not None
        flan = self.variant == "flan"

        path = "universal" if self.variant == "lora" else st.path
        if (path == "routed" and st.forced == UNIVERSAL and st.row_ids is None
                and st.row_fixed is None):
            path = "universal"
        if path == "universal":
            if self.variant != "res":
                experts = self._single(self.universal, self.universal_scaling)
            if capture:
                effective = xa.new_zeros(*lead, self.n_gates)
                if flan:
                    effective[..., 0] = 1
        elif path == "domain":
            k = st.path_domain
            experts = self._single(list(self.experts.values())[k], self.domain_scaling)
            if capture:
                effective = F.one_hot(
                    torch.full(lead, k + flan, dtype=torch.long, device=x.device), self.n_gates
                ).to(dtype)
        elif not (self.variant == "res" and len(self.experts) == 0):
            experts, shared = self._full_stack()
            ids = self._pins(x.shape[0], x.dim(), x.device)
            if ids is None or not st.rows_all_pinned:
                mask = self._row_view(st.row_mask, lead) if st.row_mask is not None else None
                if st.forced == UNIVERSAL or not st.router_rows:
                    # Res: unpinned rows get the universal alone; or no row needs the router
                    gates = xa.new_zeros(*lead, self.n_gates)
                elif dropout_active or (self.top_k is not None and self.top_k < self.n_gates):
                    gates = self.route(xa, mask)  # the experts read a different x, or run sparse
                else:
                    # one GEMM for the router and the experts' shrink (they read the same x)
                    both = F.linear(xa, shared)
                    shrunk, logits = both.split([shared.shape[0] - self.n_gates, self.n_gates], -1)
                    gates = self._gates(logits, mask)
                if st.row_fixed is not None:
                    fixed = self._row_view(st.row_fixed, lead).unsqueeze(-1)
                    given = self._row_view(st.row_weights, lead).to(gates.dtype)
                    gates = torch.where(fixed, given, gates)
                if st.collect is not None:
                    st.collect.append(gates)
            if capture:
                effective = gates
                if ids is not None:
                    effective = self._pinned_gates(ids, gates, lead, dtype)
        if capture and effective is not None:
            g = effective.detach()
            st.capture.setdefault(self.name, []).append(g.unsqueeze(0) if g.dim() == 2 else g)
        if experts is None and residual is None:
            return result.view(*lead, -1)
        if experts is not None and experts.A.dtype != dtype:
            experts = ExpertStack(experts.A.to(dtype), experts.B.to(dtype), experts.ranks,
                                  experts.scaling)

        in_place = (
            result.dtype == dtype
            and result.is_contiguous()
            and not (result.is_leaf and result.requires_grad)
        )
        def flat(t: Tensor | None) -> Tensor | None:
            """Tokens in one flat batch, except when rows are pinned (the kernel needs rows)."""
            return t.reshape(-1, t.shape[-1]) if t is not None and ids is None else t

        out = expert_mixture(
            flat(z),
            experts,
            gates=flat(gates),
            expert_ids=ids,
            residual=residual,
            negative_slope=self.negative_slope,
            shrunk=flat(shrunk),
            out=result if in_place else None,
            backend=st.backend,
        )
        if not in_place:
            out = result + out.reshape(result.shape).to(result.dtype)
        return out.view(*lead, -1)

    def _pins(self, rows: int, dim: int, device: torch.device) -> Tensor | None:
        """Per row of an input of ``rows`` rows and ``dim`` dimensions: the pinned expert's
        column in the stack, or -1 (use the gates). A forced domain fills the rows that neither
        pin an expert nor fix their gates."""
        st = self._state
        offset = 1 if self.variant == "flan" else 0
        fills = st.forced is not None and (
            st.forced >= 0 or (st.forced == UNIVERSAL and self.variant == "flan"))
        if st.row_ids is None and not fills:
            return None
        if st.row_ids is None:
            ids = torch.full((rows,), -1, dtype=torch.long, device=device)
        else:
            ids = st.row_ids
            if ids.shape[0] != rows:
                if dim < 3 or rows % ids.shape[0] != 0:
                    raise ValueError(
                        f"expert_ids has {ids.shape[0]} rows but the layer input has {rows}"
                    )
                ids = ids.repeat_interleave(rows // ids.shape[0])  # beams / returned sequences
            ids = ids.to(device)
            ids = torch.where(ids >= 0, ids + offset, ids)
        if fills:
            free = ids < 0
            if st.row_fixed is not None:
                fixed = st.row_fixed.to(device)
                if fixed.shape[0] != rows:
                    fixed = fixed.repeat_interleave(rows // fixed.shape[0])
                free = free & ~fixed
            fill = st.forced + offset if st.forced >= 0 else 0
            ids = torch.where(free, torch.full_like(ids, fill), ids)
        return ids

    def _pinned_gates(self, ids: Tensor, gates: Tensor | None, lead, dtype) -> Tensor:
        one_hot = F.one_hot(ids.clamp(min=0), self.n_gates).to(dtype)
        shape = (ids.shape[0],) + (1,) * (len(lead) - 1) + (self.n_gates,)
        one_hot = one_hot.view(shape).expand(*lead, self.n_gates)
        if gates is None:
            return one_hot
        routed = (ids < 0).view(shape[:-1] + (1,))
        return torch.where(routed, gates, one_hot)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, in={self.in_features}, out={self.out_features}, "
            f"universal_rank={self.universal_rank if self.universal is not None else None}, "
            f"domains={self.domains}"
        )
