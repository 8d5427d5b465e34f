"""``attach_modula`` and ``ModulaModel``: MoDULA on any HF causal LM, with stages and domains.

The base model is modified in place (its target linear layers become ``ModulaLinear``) and
frozen; ``ModulaModel`` wraps it, passes ``forward``/``generate`` through, and is where the
trainers switch stages, serving pins domains and reads gates, and files load experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from modula.config.names import DOMAIN_NAME_RE, RESERVED_EXPERT_NAMES
from modula.config.schema import ModulaLayerConfig
from modula.kernels import BACKENDS

from .compiled import COMPILE_TARGETS, CompiledDecode
from .inference import prepare_groups, release_groups
from .layer import UNIVERSAL, LayerState, ModulaLinear
from .request_router import RequestRouter, request_gate_weights
from .targets import default_targets, find_targets

__all__ = ["ModulaModel", "attach_modula", "enable_activation_checkpointing",
           "mean_gate_per_expert", "STAGES"]

STAGES = ("universal", "domain:<name>", "router", "joint")


def _check_domain_name(name: str) -> None:
    if not isinstance(name, str) or not DOMAIN_NAME_RE.match(name) or name in RESERVED_EXPERT_NAMES:
        raise ValueError(
            f"invalid domain name {name!r}: 1-32 chars of a-z, 0-9, '_' or '-', starting with a "
            f"letter, and not one of {sorted(RESERVED_EXPERT_NAMES)}"
        )


def enable_activation_checkpointing(model: nn.Module,
                                    context_fn: Callable[[], tuple[Any, Any]] | None = None
                                    ) -> None:
    """Hugging Face activation checkpointing of ``model``'s decoder layers, non-reentrant
    (``use_reentrant=False``: a frozen base whose inputs need no gradient still gets its
    adapters' gradients). ``context_fn`` (torch.utils.checkpoint's) gives the contexts of the
    forward and of its recomputation in the backward. Works with transformers' current name
    (``activation_checkpointing_enable``) and the older one."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.2x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_modula(
    model: nn.Module,
    cfg: ModulaLayerConfig,
    domains: list[str],
    *,
    adapter_dtype: torch.dtype | None = None,
) -> ModulaModel:
    """Turn a HF causal LM into a MoDULA model (in place) and return the wrapper.

    Why a function: the trainers, serving and eval all build the same structure from the one
    config section. ``domains`` are the domain experts in router order (empty for ``lora``).
    ``adapter_dtype`` defaults to the base weights' dtype.
    """
    return ModulaModel(model, cfg, domains, adapter_dtype=adapter_dtype)


class ModulaModel(nn.Module):
    """A frozen HF causal LM with MoDULA layers. ``forward``/``generate`` take the HF arguments
    plus ``expert_ids`` (per batch row: a domain index, or -1 to follow the router / the forced
    domain), which lets one forward serve requests pinned to different domains.

    The stage, the forced domain and gate capture are model-wide settings; ``expert_ids`` holds
    for one call. One forward at a time per model (a serving replica batches requests into one
    forward). Activation checkpointing recomputes layers in the backward, outside the call:
    :meth:`enable_activation_checkpointing` makes each recomputation run with the settings its
    forward saw (``expert_ids`` pins included) and capture no gates a second time."""

    def __init__(
        self,
        model: nn.Module,
        cfg: ModulaLayerConfig,
        domains: list[str],
        *,
        adapter_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(model, ModulaModel) or any(isinstance(m, ModulaLinear) for m in model.modules()):
            raise ValueError("this model already has MoDULA layers")
        domains = list(domains)
        for d in domains:
            _check_domain_name(d)
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains named twice: {sorted({d for d in domains if domains.count(d) > 1})}")
        if cfg.variant == "lora" and domains:
            raise ValueError("variant 'lora' has one adapter and no domain experts; pass domains=[]")
        if cfg.variant == "molora" and not domains:
            raise ValueError("variant 'molora' needs at least one domain expert")
        self.base_model = model
        self.modula_config = cfg.model_copy(deep=True)
        self.target_modules = list(cfg.target_modules or default_targets(model))
        self._state = LayerState(backend=cfg.kernel)
        self._domains = domains
        self._forced: str | None = None
        self._stage: str | None = None
        self._captured: dict[str, list[Tensor]] | None = None
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self._prepared: list = []
        self._compiled: CompiledDecode | None = None
        paths = find_targets(model, self.target_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        for path in paths:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            setattr(
                parent,
                child,
                ModulaLinear(base, cfg, domains, self._state, path, dtype=adapter_dtype),
            )
        self._layer_paths = paths
        self.request_router: RequestRouter | None = None
        hf_cfg = getattr(model, "config", None)
        hidden = getattr(hf_cfg, "hidden_size", None)
        n_layers = getattr(hf_cfg, "num_hidden_layers", None)
        if cfg.variant in ("flan", "res") and isinstance(hidden, int) and isinstance(n_layers, int):
            device = next(iter(model.parameters())).device
            self.request_router = RequestRouter(hidden, n_layers, len(domains), device=device)
        self.set_stage(None)

    # ---- structure ---------------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def variant(self) -> str:
        return self.modula_config.variant

    @property
    def domains(self) -> list[str]:
        """Domain experts in router order."""
        return list(self._domains)

    @property
    def expert_names(self) -> list[str]:
        """Names of the gate columns: Flan mixes the universal expert first."""
        if self.variant == "lora":
            return []
        return (["universal"] if self.variant == "flan" else []) + self.domains

    def modula_layers(self) -> dict[str, ModulaLinear]:
        """The adapted layers by their dotted path in the base model."""
        return {p: self.base_model.get_submodule(p) for p in self._layer_paths}

    @property
    def kernel_backend(self) -> str:
        return self._state.backend

    @kernel_backend.setter
    def kernel_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r} (allowed: {', '.join(BACKENDS)})")
        self._state.backend = backend

    # ---- stages ------------------------------------------------------------------------

    @property
    def stage(self) -> str | None:
        return self._stage

    def _allowed_stages(self) -> list[str]:
        return {
            "lora": ["universal", "joint"],
            "molora": ["router", "joint"],
            "flan": ["universal", "domain:<name>", "router", "joint"],
            "res": ["universal", "domain:<name>", "router", "joint"],
        }[self.variant]

    def set_stage(self, stage: str | None) -> None:
        """Make exactly the stage's parameters trainable and put the right experts in the path.

        - ``universal``: only E* trains and only E* is in the path (``y = W0 x + s B* A* x``);
        - ``domain:<name>``: only that expert trains, alone in the path (Flan/MoLoRA:
          ``W0 x + s B_i A_i x``; Res: ``W0 x + h + s B_i LeakyReLU(A_i h)``, gate fixed at 1);
        - ``router``: only the routers train, the full mixture runs;
        - ``joint``: every adapter trains together (the LoRA and MoLoRA baselines);
        - ``None``: nothing trains, the full mixture runs (inference).
        """
        path, path_domain = "routed", None
        if stage is None:
            trainable = []
        else:
            kind = stage.split(":", 1)[0] + (":<name>" if stage.startswith("domain:") else "")
            allowed = self._allowed_stages()
            if kind not in allowed:
                raise ValueError(
                    f"stage {stage!r} does not apply to variant {self.variant!r} "
                    f"(allowed: {', '.join(allowed)}, or None for inference)"
                )
            layers = list(self.modula_layers().values())
            if stage == "universal":
                trainable = [lyr.universal for lyr in layers]
                path = "universal"
            elif stage.startswith("domain:"):
                name = stage[len("domain:"):]
                if name not in self._domains:
                    raise ValueError(
                        f"stage {stage!r}: unknown domain {name!r} (domains: {', '.join(self._domains) or 'none'})"
                    )
                trainable = [lyr.experts[name] for lyr in layers]
                path, path_domain = "domain", self._domains.index(name)
            elif stage == "router":
                trainable = [lyr.router for lyr in layers]
            else:  # joint
                trainable = [m for lyr in layers for m in (lyr.universal, lyr.router, *lyr.experts.values()) if m is not None]
        self.release_inference()  # a stage trains: the derived weights would go stale
        for p in self.parameters():
            p.requires_grad_(False)
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        self._stage = stage
        self._state.path = path
        self._state.path_domain = path_domain
        self._state.changed()

    def trainable_parameter_count(self) -> int:
        """Parameters that the current stage trains (the cost accounting of a run)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def expert_parameters(self, name: str) -> list[nn.Parameter]:
        """All tensors of one expert (``universal``, a domain, or ``routers``) over the layers."""
        out: list[nn.Parameter] = []
        for lyr in self.modula_layers().values():
            if name == "routers":
                if lyr.router is None:
                    raise KeyError(f"variant {self.variant!r} has no routers")
                out.append(lyr.router.weight)
            else:
                e = lyr.expert_module(name)
                out += [e.A, e.B]
        return out

    # ---- activation checkpointing ------------------------------------------------------

    def enable_activation_checkpointing(self) -> None:
        """Checkpoint the base model's decoder layers (recomputed in the backward); the
        recomputation sees the layer settings of its own forward."""
        enable_activation_checkpointing(self.base_model, context_fn=self._checkpoint_contexts)

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        """Called as a checkpointed layer's forward starts: nothing to do for the forward; the
        recomputation restores the settings seen now (pins, stage path, forced domain), with
        gate capture off (the forward captured them already)."""
        return nullcontext(), self._layer_state_as(dataclasses.replace(self._state, capture=None))

    @contextmanager
    def _layer_state_as(self, saved: LayerState) -> Iterator[None]:
        st = self._state
        names = [f.name for f in dataclasses.fields(LayerState)]
        before = {n: getattr(st, n) for n in names}
        for n in names:
            setattr(st, n, getattr(saved, n))
        try:
            yield
        finally:
            for n, v in before.items():
                setattr(st, n, v)

    # ---- domains -----------------------------------------------------------------------

    def add_domain(self, name: str) -> None:
        """Add a domain expert (B = 0, so outputs do not move until it is trained); every
        router grows a zero row. Existing experts are untouched. Rebuild the optimiser after."""
        if self.variant == "lora":
            raise ValueError("variant 'lora' has no domain experts")
        _check_domain_name(name)
        if name in self._domains:
            raise ValueError(f"domain {name!r} already exists")
        self.release_inference()
        for lyr in self.modula_layers().values():
            lyr.add_expert(name)
        if self.request_router is not None:
            self.request_router.add_class()
        self._domains.append(name)
        self._sync()

    def remove_domain(self, name: str) -> None:
        """Remove a domain expert and its router row from every layer."""
        if name not in self._domains:
            raise ValueError(f"unknown domain {name!r} (domains: {', '.join(self._domains) or 'none'})")
        if self.variant == "molora" and len(self._domains) == 1:
            raise ValueError("variant 'molora' needs at least one domain expert")
        self.release_inference()
        for lyr in self.modula_layers().values():
            lyr.remove_expert(name)
        if self.request_router is not None:
            self.request_router.remove_class(1 + self._domains.index(name))
        self._domains.remove(name)
        if self._forced == name:
            self._forced = None
        if self._stage == f"domain:{name}":
            self._stage = None
        self._sync()

    def _sync(self) -> None:
        self.set_stage(self._stage)
        self.force_domain(self._forced)

    def force_domain(self, name: str | None) -> None:
        """Pin every request to one domain (one-hot gates), ``"universal"`` for the universal
        expert alone, or ``None`` to route by the gates again."""
        if name is None:
            index = None
        elif name == "universal":
            if self.variant in ("molora",):
                raise ValueError("variant 'molora' has no universal expert")
            index = UNIVERSAL
        elif name in self._domains:
            index = self._domains.index(name)
        else:
            raise ValueError(
                f"unknown domain {name!r} (allowed: {', '.join(self._domains + ['universal'])}, None)"
            )
        self._forced = name
        self._state.forced = index
        self._state.changed()

    @property
    def forced_domain(self) -> str | None:
        return self._forced

    # ---- forward -----------------------------------------------------------------------

    @contextmanager
    def _call(self, expert_ids: Tensor | list[int] | None = None,
              expert_weights: Tensor | None = None,
              expert_mask: Tensor | None = None) -> Iterator[None]:
        """Set the per-row routing inputs of one call (see :meth:`forward`)."""
        st = self._state
        if (expert_ids is None and expert_weights is None and expert_mask is None) or (
                self.variant == "lora"):
            yield
            return
        n = len(self._domains)
        cols = len(self.expert_names)
        rows = None
        ids = None
        if expert_ids is not None:
            ids = torch.as_tensor(expert_ids, dtype=torch.long)
            if ids.dim() != 1:
                raise ValueError(f"expert_ids must be 1-D (one id per batch row), got shape "
                                 f"{tuple(ids.shape)}")
            cpu = ids.cpu()
            if bool(((cpu < -1) | (cpu >= n)).any()):
                raise ValueError(f"expert_ids must lie in [-1, {n - 1}] (-1 = routed; domains: "
                                 f"{self._domains})")
            rows = ids.shape[0]
        fixed = weights = mask = None
        if expert_weights is not None:
            weights = torch.as_tensor(expert_weights, dtype=torch.float32)
            if weights.dim() != 2 or weights.shape[1] != cols or (
                    rows is not None and weights.shape[0] != rows):
                raise ValueError(f"expert_weights must be (rows, {cols}) over {self.expert_names}"
                                 f", got shape {tuple(weights.shape)}")
            rows = weights.shape[0]
            nan = torch.isnan(weights)
            fixed = ~nan.all(1)
            if bool((nan.any(1) & fixed).any()) or bool((weights[fixed] < 0).any()) or not bool(
                    torch.isfinite(weights[fixed]).all()):
                raise ValueError("expert_weights: each row is all NaN (follow the router) or "
                                 "finite and >= 0")
            if self.variant in ("flan", "molora") and bool((weights[fixed].sum(1) <= 0).any()):
                raise ValueError(f"expert_weights: a fixed row must give some weight to an "
                                 f"expert (variant {self.variant!r} has no expert-free path)")
            weights = weights.nan_to_num(0.0)
        if expert_mask is not None:
            mask = torch.as_tensor(expert_mask, dtype=torch.bool)
            if mask.dim() != 2 or mask.shape[1] != cols or (
                    rows is not None and mask.shape[0] != rows):
                raise ValueError(f"expert_mask must be (rows, {cols}) over {self.expert_names}, "
                                 f"got shape {tuple(mask.shape)}")
            if self.variant in ("flan", "molora") and not bool(mask.any(1).all()):
                raise ValueError(f"expert_mask: every row must allow an expert (variant "
                                 f"{self.variant!r} has no expert-free path)")
            rows = mask.shape[0]
        pinned = ids >= 0 if ids is not None else torch.zeros(rows, dtype=torch.bool)
        not_fixed = ~fixed if fixed is not None else torch.ones(rows, dtype=torch.bool)
        forced = st.forced
        fills = forced is not None and (forced >= 0 or self.variant == "flan")
        free = ~pinned & not_fixed
        st.row_ids = ids if ids is not None and bool(pinned.any()) else None
        st.rows_all_pinned = bool(pinned.all()) or (fills and bool(not_fixed.all()))
        st.row_fixed = fixed if fixed is not None and bool(fixed.any()) else None
        st.row_weights = weights if st.row_fixed is not None else None
        st.row_mask = mask
        st.router_rows = bool(free.any()) and not fills
        st.changed()
        try:
            yield
        finally:
            st.row_ids, st.rows_all_pinned = None, False
            st.row_fixed = st.row_weights = st.row_mask = None
            st.router_rows = True
            st.changed()

    def forward(self, *args, expert_ids: Tensor | list[int] | None = None,
                expert_weights: Tensor | None = None, expert_mask: Tensor | None = None,
                **kwargs):
        """The HF model's forward with per-row routing for this call.

        Semantics, per batch row (precedence in this order):

        - ``expert_ids[r] >= 0``: the row is pinned to that domain expert (one-hot gates);
        - ``expert_weights[r]`` finite (a (rows, n_gates) tensor over ``expert_names``; NaN
          rows are not fixed): the row's gates are these weights for every token, whatever
          the routers say. Weights are used as given (callers normalise); an all-zero Res row
          is the universal expert alone;
        - otherwise the learned routers decide per token, over the columns
          ``expert_mask[r]`` allows (bool, (rows, n_gates); renormalised softmax); a Res row
          that allows no column gets the universal expert alone;
        - ``force_domain`` fills the rows that neither pin nor fix (model-wide).
        """
        with self._call(expert_ids, expert_weights, expert_mask):
            step = self._compiled
            if step is not None and step.applies(args, kwargs):
                return step(*args, **kwargs)
            return self.base_model(*args, **kwargs)

    def generate(self, *args, expert_ids: Tensor | list[int] | None = None,
                 expert_weights: Tensor | None = None, expert_mask: Tensor | None = None,
                 **kwargs):
        """HF ``generate`` with the MoDULA layers and this call's per-row routing (as
        :meth:`forward`) in place."""
        with self._call(expert_ids, expert_weights, expert_mask):
            return self.base_model.generate(*args, **kwargs)

    # ---- request-level routing ---------------------------------------------------------

    @property
    def request_classes(self) -> list[str]:
        """The request classifier's classes: ``universal`` (no domain expert), the domains."""
        return ["universal", *self._domains]

    def request_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The classifier's input for each row: the frozen base model's mean-pooled hidden
        states over the (prompt) tokens, adapters off. (batch, n_features), float32."""
        rr = self._need_request_router(trained=False)
        kw: dict[str, Any] = {}
        if attention_mask is not None:  # positions from the mask: left or right padding alike
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), self.disable_adapters():
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True, use_cache=False, **kw)
        return rr.pool(out.hidden_states, attention_mask)

    def request_probs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Class probabilities (batch, 1 + n_domains) over :attr:`request_classes`."""
        rr = self._need_request_router()
        with torch.no_grad():
            return rr.probs(self.request_features(input_ids, attention_mask))

    def request_weights(self, probs: Tensor, top_k: int | None = None) -> Tensor:
        """``expert_weights`` rows for :meth:`forward` from class probabilities (see
        :func:`~modula.model.request_router.request_gate_weights`); ``top_k`` defaults to the
        config's ``router.request_top_k``."""
        k = self.modula_config.router.request_top_k if top_k is None else top_k
        return request_gate_weights(probs, self.variant, k)

    def _need_request_router(self, trained: bool = True) -> RequestRouter:
        rr = self.request_router
        if rr is None:
            raise ValueError(f"variant {self.variant!r} (or this base model) has no request "
                             "router; request-level routing needs flan or res")
        if trained and not rr.trained:
            raise ValueError("the request router is not trained: train the router stage "
                             "(it fits the classifier) or load a model published with one")
        return rr

    # ---- inference representation ----------------------------------------------------

    def prepare_inference(self, *, fuse_siblings: bool = True, compile: str = "none") -> None:
        """Derive the inference representation once for the current weights
        (:mod:`modula.model.inference`): per group of adapted linears reading the same input
        (``q/k/v``, ``gate/up``; ``fuse_siblings``), one fused matrix with the base weights,
        the experts' derived shrinks and the routers, and the expand matrices with their
        scalings. Inference forwards (eval mode, no gradient, kernel ``auto`` or ``stacked``)
        then take the fused path; training, ``reference`` and ``triton`` take the general one.

        Only at inference (``set_stage(None)``). Loading experts, a stage, adding or removing
        a domain release it; call again after editing weights in place by hand. The fused
        base weights are shared with the base layers (views), not copied.

        ``compile``: ``decode`` runs the decode steps of :meth:`forward` (one token per row)
        through ``torch.compile``, eager if that fails (:mod:`modula.model.compiled`);
        ``none`` (default) keeps every forward eager."""
        if self._stage is not None:
            raise ValueError(f"prepare_inference needs the inference stage (set_stage(None)), "
                             f"not {self._stage!r}")
        if compile not in COMPILE_TARGETS:
            raise ValueError(f"unknown compile target {compile!r} (allowed: "
                             f"{', '.join(COMPILE_TARGETS)})")
        self.release_inference()
        self._prepared = prepare_groups(self.modula_layers(), fuse_siblings=fuse_siblings)
        self._compiled = CompiledDecode(self) if compile == "decode" else None
        self._state.changed()

    def release_inference(self) -> None:
        """Drop the inference representation (forwards take the general path)."""
        if getattr(self, "_prepared", None):
            release_groups(self.modula_layers())
            self._state.changed()
        self._prepared = []
        self._compiled = None

    @property
    def inference_prepared(self) -> bool:
        return bool(self._prepared)

    @property
    def compiled_decode(self) -> CompiledDecode | None:
        """The compiled decode step (``prepare_inference(compile="decode")``), else None."""
        return self._compiled

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare base model (for comparisons against the base)."""
        before = self._state.disabled
        self._state.disabled = True
        try:
            yield
        finally:
            self._state.disabled = before

    # ---- gates -------------------------------------------------------------------------

    @contextmanager
    def capture_gates(self) -> Iterator[ModulaModel]:
        """Record every layer's gates during the forwards (or generation) in this block.
        Costs a detached (batch, seq, n_experts) tensor per layer per forward."""
        self._state.capture = {}
        self._captured = self._state.capture
        self._state.changed()
        try:
            yield self
        finally:
            self._state.capture = None
            self._state.changed()

    @contextmanager
    def collect_router_gates(self) -> Iterator[list[Tensor]]:
        """The routed path's gates of every layer in this block, in call order, *with* their
        graph (each (batch, seq, n_gates)): for a loss on the routers (router supervision)."""
        gates: list[Tensor] = []
        before = self._state.collect
        self._state.collect = gates
        try:
            yield gates
        finally:
            self._state.collect = before

    def gate_weights(self) -> dict[str, Tensor]:
        """Per layer path: the gates (batch, seq, n_experts) of the captured forward(s), the
        weights each expert actually got (after top-k, pins, stage). Generation steps are
        concatenated along seq. Columns follow ``expert_names``."""
        if self._captured is None:
            raise RuntimeError("no gates captured: run the forward inside `with model.capture_gates():`")
        out = {}
        for name, parts in self._captured.items():
            try:
                out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            except RuntimeError as exc:
                raise ValueError(
                    "captured forwards have different batch sizes; capture one forward "
                    "(or one generate call) per `capture_gates()` block"
                ) from exc
        return out

    def mean_gates(self, attention_mask: Tensor | None = None, *, per_layer: bool = False) -> Tensor:
        """Mean gate per expert over non-pad tokens: (batch, n_experts) averaged over layers,
        or (n_layers, batch, n_experts) with ``per_layer`` (serving response, eval heatmaps)."""
        return mean_gate_per_expert(self.gate_weights(), attention_mask, per_layer=per_layer)

    # ---- detaching ---------------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Put the original linear layers back and return the plain base model."""
        self.release_inference()
        for path, lyr in self.modula_layers().items():
            parent_name, _, child = path.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, lyr.base_layer)
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(n, False))
        self._layer_paths = []
        return self.base_model


def mean_gate_per_expert(
    gates: Mapping[str, Tensor] | Tensor,
    attention_mask: Tensor | None = None,
    *,
    per_layer: bool = False,
) -> Tensor:
    """Average gates over the non-pad tokens of each row.

    ``gates``: ``gate_weights()`` output or one (batch, seq, E) tensor. ``attention_mask``
    (batch, seq'): 1 for real tokens; if shorter than the gates (tokens generated after the
    prompt), the extra positions count as real. Returns (batch, E), or (layers, batch, E).
    """
    stacked = torch.stack(list(gates.values())) if isinstance(gates, Mapping) else gates.unsqueeze(0)
    if stacked.numel() == 0:
        raise ValueError("no gates to average")
    stacked = stacked.float()
    L, B, S, E = stacked.shape
    if attention_mask is None:
        mask = stacked.new_ones(B, S)
    else:
        mask = attention_mask.to(stacked.device, torch.float32)
        if mask.shape[0] != B or mask.shape[1] > S:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not fit gates of batch {B}, seq {S}")
        if mask.shape[1] < S:
            mask = torch.cat([mask, mask.new_ones(B, S - mask.shape[1])], 1)
    weights = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    per = torch.einsum("lbse,bs->lbe", stacked, weights)
    if per_layer:
        return per if isinstance(gates, Mapping) else per[0]
    return per.mean(0)
