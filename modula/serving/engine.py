"""The generation engine of an expert replica: continuous batching over any HF causal LM.

Requests for different domains share one batch. Each step:

1. *admit*: the requests that arrived since the last step (up to the free slots) are prefilled
   together in one forward, left-padded, each row with its own routing (:class:`RowRouting`: a
   pinned domain, fixed gate weights, a mask over the experts the routers may pick, or the
   routers alone); the first token of each is sampled. Rows that ask for the log
   probabilities of their prompt (``echo``) get the logits of every position; the others only
   the last one's;
2. *merge*: their KV cache joins the running batch's (the shorter one is left-padded along the
   time axis, so every row keeps its tokens right-aligned);
3. *decode*: one forward over every running row (one new token each, per-row positions), one
   token sampled per row (with its log probability and the best alternatives, from the same
   logits, when the request asks); rows finish on their own (eos, a stop token or sequence,
   ``max_tokens``, the context limit, or the client going away) and leave the batch at once;
   time columns that no remaining row uses are cut from the front of the cache.

:class:`EngineCore` is synchronous and single-threaded (tests drive it step by step);
:class:`AsyncEngine` runs it on one worker thread and hands each request an async iterator of
events, which both the streaming and the plain endpoints consume. Ray-free.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modula.serving.protocol import (
    APIError,
    GenerationRequest,
    GenerationResult,
    Routing,
    TokenLogprob,
)
from modula.serving.sampling import make_generator, sample_next
from modula.serving.text import TextTracker

__all__ = [
    "AsyncEngine",
    "EngineCore",
    "EngineStats",
    "Finished",
    "Failed",
    "ModelAdapter",
    "RequestStream",
    "RowRouting",
    "TokenDelta",
    "modula_adapter",
    "token_logprobs",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ events


@dataclass
class TokenDelta:
    """New text of one request (may be '' when tokens were held back); with log
    probabilities, those of the tokens not reported yet (and, on the first delta, the
    prompt's)."""

    text: str
    n_tokens: int
    first: bool = False
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Finished:
    """The request is done; `result.text` is the whole text, `result.logprobs` every token's."""

    result: GenerationResult
    last_delta: str = ""


@dataclass
class Failed:
    """The engine could not run the request (a bug or resource problem, not bad input)."""

    error: BaseException


Event = TokenDelta | Finished | Failed


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class RowRouting:
    """The routing of one batch row over the model's gate columns (``ModelAdapter.gate_names``):
    ``expert_id`` >= 0 pins a domain expert (-1: not pinned); ``weights``, one per column,
    fixes the gates; ``mask``, one per column, restricts the learned routing to the columns
    it allows. All unset: the learned routers decide. Passed to ``ModulaModel.forward`` as
    ``expert_ids`` / ``expert_weights`` / ``expert_mask``."""

    expert_id: int = -1
    weights: tuple[float, ...] | None = None
    mask: tuple[bool, ...] | None = None


ROUTED = RowRouting()


def _row(r: RowRouting | int) -> RowRouting:
    return r if isinstance(r, RowRouting) else (ROUTED if r < 0 else RowRouting(expert_id=r))


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """Per row of `logits` (N, V): the log probability of `chosen[i]` and the `k` most likely
    tokens with theirs (log-softmax in float32 of the raw logits)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(chosen), dtype=torch.long)
    mine = lp.gather(1, idx[:, None])[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(min(k, lp.shape[1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(),
                                                                strict=True)]
    else:
        tops = [()] * len(mine)
    return [(int(t), float(v), top) for t, v, top in zip(chosen, mine, tops, strict=True)]


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


class ModelAdapter:
    """What the engine needs from a model: one forward with a cache, optional per-row experts
    and gate capture. Works with any HF causal LM (no experts, no gates); a MoDULA model also
    takes ``expert_ids`` and reports its gates (see :mod:`modula.serving.modeling`)."""

    def __init__(self, model: Any, hf_model: Any | None = None, *, domains: Sequence[str] = (),
                 gate_names: Sequence[str] | None = None,
                 gate_fn: Callable[..., Any] | None = None,
                 takes_expert_ids: bool = False, version: Any = None,
                 info: dict[str, Any] | None = None,
                 classify: Callable[[torch.Tensor, torch.Tensor],
                                    tuple[torch.Tensor, torch.Tensor]] | None = None,
                 request_classes: Sequence[str] = ()):
        self.model = model
        # request-level routing (router.granularity: request): (ids, mask) of routed prompts
        # -> (class probabilities, one row of gate weights per prompt)
        self.classify = classify
        self.request_classes = list(request_classes)
        self.hf_model = hf_model if hf_model is not None else model
        self.domains = list(domains)
        self.gate_names = list(gate_names) if gate_names is not None else None
        self._gate_fn = gate_fn  # (callable running the forward) -> (output, gates|None)
        self.takes_expert_ids = takes_expert_ids
        self.version = version
        self.info = dict(info or {})
        params = _forward_params(self.hf_model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        cfg = getattr(self.hf_model, "config", None)
        self.config = cfg
        self.max_positions = getattr(cfg, "max_position_embeddings", None) if cfg else None
        self.vocab_size = getattr(cfg, "vocab_size", None) if cfg else None
        self.device = next(iter(self.hf_model.parameters())).device
        gen_cfg = getattr(self.hf_model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if eos is None and cfg is not None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids = {int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))}

    def expert_id(self, domain: str | None) -> int:
        """-1 (routed) for None, else the router index of `domain` (KeyError if unknown)."""
        if domain is None:
            return -1
        if domain not in self.domains:
            raise KeyError(domain)
        return self.domains.index(domain)

    def row_routing(self, routing: Routing | None) -> RowRouting:
        """A request's routing over this model's gate columns: KeyError naming an expert the
        model does not have; ValueError for a routing the model cannot do."""
        if routing is None or routing.mode == "routed":
            return ROUTED
        if routing.mode == "pinned":
            return RowRouting(expert_id=self.expert_id(routing.domain))
        if not self.gate_names:
            raise ValueError("this service runs a model without routed experts (the base model "
                             "alone, or a single LoRA): there are no expert weights to set")
        cols = self.gate_names
        for name in routing.names():
            if name not in cols:
                if name == "universal":
                    raise ValueError("the universal expert of this model is always on (it is "
                                     "not gated): weights and domains name the gated experts ("
                                     f"{', '.join(cols)})")
                raise KeyError(name)
        if routing.weights is not None:
            given = dict(routing.weights)
            return RowRouting(weights=tuple(float(given.get(c, 0.0)) for c in cols))
        allowed = set(routing.allowed or ())
        return RowRouting(mask=tuple(c in allowed for c in cols))

    def new_cache(self) -> Any:
        """A plain dynamic KV cache: every layer keeps all its tokens, even for sliding-window
        attention (the attention mask applies the window), so batches can be merged and cut
        along one time axis."""
        from transformers import DynamicCache

        return DynamicCache()

    def _routing_kwargs(self, rows: Sequence[RowRouting | int]) -> dict[str, Any]:
        """``expert_ids`` / ``expert_weights`` / ``expert_mask`` for the rows that need them
        (an all-routed batch takes the plain routed path)."""
        if not self.takes_expert_ids:
            return {}
        rr = [_row(r) for r in rows]
        kw: dict[str, Any] = {}
        if any(r.expert_id >= 0 for r in rr):
            kw["expert_ids"] = torch.tensor([r.expert_id for r in rr], dtype=torch.long,
                                            device=self.device)
        cols = len(self.gate_names or ())
        if any(r.weights is not None for r in rr):
            w = torch.full((len(rr), cols), float("nan"))
            for i, r in enumerate(rr):
                if r.weights is not None:
                    w[i] = torch.tensor(r.weights)
            kw["expert_weights"] = w.to(self.device)
        if any(r.mask is not None for r in rr):
            m = torch.ones((len(rr), cols), dtype=torch.bool)
            for i, r in enumerate(rr):
                if r.mask is not None:
                    m[i] = torch.tensor(r.mask)
            kw["expert_mask"] = m.to(self.device)
        return kw

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache: Any, rows: Sequence[RowRouting | int],
                want_gates: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the last position (B, V) and, for a MoDULA model, the gates of every
        position averaged over layers (B, S, n_experts). `rows`: each row's routing (or an
        expert id: -1 routed, >= 0 pinned)."""
        last, gates, _ = self.forward_full(input_ids, attention_mask, position_ids, cache,
                                           rows, want_gates)
        return last, gates

    def forward_full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, cache: Any, rows: Sequence[RowRouting | int],
                     want_gates: bool, full_rows: Sequence[int] = ()
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As :meth:`forward`, plus the logits of every position (F, S, V) of the rows
        `full_rows` (None if none). The other rows' hidden states never reach the output
        head: a hook on it packs the positions that are needed into one call."""
        kw: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
            self._cache_kw: cache,
            "use_cache": True,
        }
        full_rows = list(full_rows)
        if self._keep_kw:
            kw[self._keep_kw] = 0 if full_rows else 1
        kw.update(self._routing_kwargs(rows))
        packed: list[int] = []
        handle = None
        b, s = input_ids.shape
        if full_rows:
            head = self.hf_model.get_output_embeddings()

            def pack(_module: Any, args: tuple[Any, ...]) -> Any:
                h = args[0]
                if packed or not isinstance(h, torch.Tensor) or h.dim() != 3 \
                        or tuple(h.shape[:2]) != (b, s):
                    return None
                packed.append(1)
                sel = torch.cat([h[full_rows].reshape(-1, h.shape[-1]), h[:, -1]], 0)
                return (sel.unsqueeze(0), *args[1:])

            if head is not None:
                handle = head.register_forward_pre_hook(pack)
        try:
            if self._gate_fn is not None and want_gates:
                out, gates = self._gate_fn(lambda: self.model(**kw))
            else:
                out, gates = self.model(**kw), None
        finally:
            if handle is not None:
                handle.remove()
        logits = out.logits if hasattr(out, "logits") else out[0]
        if not full_rows:
            return logits[:, -1, :].float().cpu(), gates, None
        if packed:  # (1, F*S + B, V): the asking rows' positions, then every row's last
            flat = logits[0].float().cpu()
            f = len(full_rows) * s
            return flat[f:], gates, flat[:f].view(len(full_rows), s, -1)
        logits = logits.float().cpu()  # the head was not called as a module: keep what came
        return logits[:, -1, :], gates, logits[full_rows]


def _gate_fn(model: Any):
    """Runs a forward with gate capture; returns (output, gates averaged over layers)."""

    def run(forward):
        with model.capture_gates():
            out = forward()
            gates = model.gate_weights()
        if not gates:
            return out, None
        stacked = torch.stack([g.float() for g in gates.values()])  # (L, B, S, E)
        return out, stacked.mean(0)

    return run


def modula_adapter(model: Any, *, version: Any = None, info: dict[str, Any] | None = None,
                   granularity: str | None = None, request_top_k: int | None = None,
                   compile: str = "none") -> ModelAdapter:
    """A :class:`ModelAdapter` over a MoDULA model (``attach_modula`` / ``load_modula``): what
    a replica serves, and what ``benchmarks/gpu_check.py`` measures. ``granularity`` /
    ``request_top_k``: the serving config's routing (default: the model's own config); request
    routing needs a model published with a trained classifier. ``compile``: ``serve.compile``
    (``decode``: the decode steps through ``torch.compile``, eager if that fails)."""
    model.eval()
    model.set_stage(None)
    model.force_domain(None)
    # the fused inference weights, derived once for this version
    model.prepare_inference(compile=compile)
    names = list(model.expert_names)
    domains = list(model.domains)
    rr = model.request_router
    router_cfg = model.modula_config.router
    granularity = granularity or router_cfg.granularity
    top_k = request_top_k if request_top_k is not None else router_cfg.request_top_k
    by_request = granularity == "request" and rr is not None and rr.trained and bool(domains)
    if granularity == "request" and not by_request:
        log.warning("router.granularity is request, but this model has no trained request "
                    "classifier (variant %s): routing per token", model.variant)
    return ModelAdapter(
        model, hf_model=model.base_model, domains=domains,
        gate_names=names or None, gate_fn=_gate_fn(model) if names else None,
        takes_expert_ids=bool(domains), version=version,
        info={"variant": model.variant,
              "granularity": "request" if by_request else "token", **(info or {})},
        classify=_classifier(model, top_k) if by_request else None,
        request_classes=model.request_classes if by_request else (),
    )


def _classifier(model: Any, top_k: int) -> Callable[[torch.Tensor, torch.Tensor],
                                                    tuple[torch.Tensor, torch.Tensor]]:
    """The request classifier of a MoDULA model as the engine calls it: one base forward of
    the prompts (adapters off), class probabilities and the gate weights they give."""
    dev = next(iter(model.base_model.parameters())).device

    def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = model.request_probs(ids.to(dev), mask.to(dev))
        return probs.float().cpu(), model.request_weights(probs, top_k).float().cpu()

    return run


# ------------------------------------------------------------------------------------ cache


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__} (expected a "
                        "transformers Cache with .layers)")
    return list(layers)


def _check_cache(cache: Any) -> None:
    for layer in _cache_layers(cache):
        if getattr(layer, "is_sliding", False):
            raise TypeError("sliding-window caches are not supported by the continuous "
                            "batcher (the model uses sliding-window attention)")


def _pad_time(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Left-pad the time axis (-2) of a (B, H, T, D) tensor with zeros."""
    if extra <= 0:
        return t
    pad = t.new_zeros(*t.shape[:-2], extra, t.shape[-1])
    return torch.cat([pad, t], dim=-2)


def _merge_caches(a: Any, mask_a: torch.Tensor, b: Any, mask_b: torch.Tensor
                  ) -> tuple[Any, torch.Tensor]:
    """Rows of `b` appended to `a`, time axes right-aligned; returns (a, merged mask)."""
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    for la, lb in zip(_cache_layers(a), _cache_layers(b), strict=True):
        la.keys = torch.cat([_pad_time(la.keys, t - ta), _pad_time(lb.keys, t - tb)], dim=0)
        la.values = torch.cat([_pad_time(la.values, t - ta), _pad_time(lb.values, t - tb)],
                              dim=0)
    ma = torch.cat([mask_a.new_zeros(mask_a.shape[0], t - ta), mask_a], dim=1)
    mb = torch.cat([mask_b.new_zeros(mask_b.shape[0], t - tb), mask_b], dim=1)
    return a, torch.cat([ma, mb], dim=0)


def _select_rows(cache: Any, keep: torch.Tensor) -> None:
    for layer in _cache_layers(cache):
        layer.keys = layer.keys.index_select(0, keep.to(layer.keys.device))
        layer.values = layer.values.index_select(0, keep.to(layer.values.device))


def _trim_front(cache: Any, start: int) -> None:
    for layer in _cache_layers(cache):
        layer.keys = layer.keys[:, :, start:, :]
        layer.values = layer.values[:, :, start:, :]


# ------------------------------------------------------------------------------------ core


@dataclass
class _Row:
    req: GenerationRequest
    routing: RowRouting
    sink: Callable[[Event], None]
    tracker: TextTracker
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet fed to the model
    n_real: int = 0  # real tokens of this row in the cache
    gate_sum: torch.Tensor | None = None
    gate_tokens: int = 0
    admitted: float = 0.0
    first_token_at: float | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # every generated token's, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None
    reported: int = 0  # logprob entries already handed out in a TokenDelta
    prompt_reported: bool = False
    request_probs: dict[str, float] | None = None  # the request classifier's, when it routed

    @property
    def expert_id(self) -> int:
        return self.routing.expert_id


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    prefill_rows: int = 0
    decode_rows: int = 0  # summed over decode steps: mean batch = decode_rows / decode_steps
    decode_steps: int = 0
    tokens_out: int = 0
    max_batch: int = 0

    def as_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["mean_decode_batch"] = self.decode_rows / self.decode_steps if self.decode_steps else 0.0
        return d


class EngineCore:
    """Continuous batching over one model. `add` and `abort` may be called from any thread;
    `step` from one thread at a time."""

    def __init__(self, adapter: ModelAdapter, tokenizer: Any, *, max_running: int = 32,
                 max_context: int | None = None, gate_report: str = "all"):
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        if gate_report not in ("prompt", "all", "off"):
            raise ValueError(f"gate_report must be prompt, all or off (got {gate_report!r})")
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.max_running = max_running
        limits = [x for x in (max_context, adapter.max_positions) if x]
        self.max_context = min(limits) if limits else None
        # gates of the prompt come with the prefill forward; "all" captures every decode step
        has_gates = adapter.gate_names is not None and gate_report != "off"
        self.gate_report = gate_report if has_gates else "off"
        self._prefill_gates = has_gates
        self._decode_gates = has_gates and gate_report == "all"
        eos = set(adapter.eos_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
        self.vocab_limit = min(x for x in (adapter.vocab_size, len(tokenizer)) if x)
        self._lock = threading.Lock()
        self._inbox: collections.deque[_Row] = collections.deque()
        self._aborted: set[str] = set()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self.stats = EngineStats()

    # ---------------------------------------------------------------- requests

    def add(self, req: GenerationRequest, routing: RowRouting | int,
            sink: Callable[[Event], None]) -> None:
        """Queue a request with its routing (a :class:`RowRouting`, or an expert id: -1
        routed, >= 0 pinned); `sink` receives its events (from the stepping thread)."""
        if not req.prompt_ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_limit]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range [0, {self.vocab_limit}).",
                           param="prompt", code="invalid_value")
        if self.max_context is not None and len(req.prompt_ids) >= self.max_context:
            raise APIError(400, f"The prompt has {len(req.prompt_ids)} tokens; this model's "
                                f"context is {self.max_context}.", param="prompt",
                           code="context_length_exceeded")
        p = req.params
        row = _Row(req=req, routing=_row(routing), sink=sink,
                   tracker=TextTracker(self.tokenizer, p.stop, req.prompt_ids),
                   generator=make_generator(p.seed) if p.temperature > 0 else None,
                   logprobs=[] if p.logprobs is not None else None)
        with self._lock:
            self._inbox.append(row)

    def abort(self, request_id: str) -> None:
        """Drop a request (the client went away); its row leaves the batch at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._waiting or self._rows)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._waiting)

    # ---------------------------------------------------------------- stepping

    def step(self) -> None:
        """One engine iteration: admit (prefill) new requests, then decode one token for every
        running row. An exception from the model fails every request in flight (each gets a
        :class:`Failed` event) and leaves the engine empty and usable."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            aborted, self._aborted = self._aborted, set()
        if aborted:
            self._waiting = collections.deque(r for r in self._waiting
                                              if r.req.request_id not in aborted)
            self._drop([i for i, r in enumerate(self._rows) if r.req.request_id in aborted])
        self.stats.steps += 1
        new: list[_Row] = []
        try:
            with torch.inference_mode():
                free = self.max_running - len(self._rows)
                if free > 0 and self._waiting:
                    new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                    self._prefill(new)
                    new = []
                if self._rows:
                    self._decode()
        except Exception as exc:  # noqa: BLE001 - reported to every request in flight
            victims = [r for r in (*self._rows, *new) if r.finish_reason is None]
            log.exception("engine step failed; failing %d requests", len(victims))
            for r in victims:
                r.finish_reason = "error"
                r.sink(Failed(exc))
            self._rows, self._cache, self._mask = [], None, None

    def _prefill(self, new: list[_Row]) -> None:
        n = len(new)
        length = max(len(r.req.prompt_ids) for r in new)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, r in enumerate(new):
            p = r.req.prompt_ids
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.adapter.new_cache()
        full_rows = [i for i, r in enumerate(new) if r.req.params.prompt_logprobs is not None]
        self._classify(new, ids, mask)
        routing = [r.routing for r in new]
        if full_rows:
            logits, gates, full = self.adapter.forward_full(
                ids, mask, pos, cache, routing, self._prefill_gates, full_rows)
        else:
            (logits, gates), full = self.adapter.forward(
                ids, mask, pos, cache, routing, self._prefill_gates), None
        _check_cache(cache)
        now = time.time()
        if gates is not None:
            g = gates.float().cpu() * mask[:, :, None]
            sums = g.sum(dim=1)
        for i, r in enumerate(new):
            r.n_real = len(r.req.prompt_ids)
            r.admitted = now
            if gates is not None:
                r.gate_sum = sums[i].clone()
                r.gate_tokens = r.n_real
        if full is not None:
            for j, i in enumerate(full_rows):
                r = new[i]
                p = list(r.req.prompt_ids)
                # position t predicts token t + 1; the prompt's tokens sit at the right end
                rows = full[j, length - len(p):length - 1]
                entries = (token_logprobs(rows, p[1:], r.req.params.prompt_logprobs or 0)
                           if len(p) > 1 else [])
                r.prompt_logprobs = [None, *entries]
        self.stats.prefills += 1
        self.stats.prefill_rows += n
        done = [i for i, r in enumerate(new) if r.req.params.max_tokens == 0]
        for i in done:  # echo with max_tokens 0: the prompt's log probabilities only
            new[i].finish_reason = "length"
            new[i].sink(Finished(self._result(new[i]), last_delta=new[i].tracker.finish()))
        sampling = [i for i in range(n) if i not in set(done)]
        if sampling:
            rows_s = [new[i] for i in sampling]
            tokens = self._sample(logits[sampling], rows_s)
            done += [i for i, t in zip(sampling, tokens, strict=True) if self._accept(new[i], t)]
        keep = [i for i in range(n) if i not in set(done)]
        if not keep:
            return
        if len(keep) < n:
            idx = torch.tensor(keep, dtype=torch.long)
            _select_rows(cache, idx)
            mask = mask.index_select(0, idx)
            new = [new[i] for i in keep]
        if self._cache is None or not self._rows:
            self._cache, self._mask = cache, mask
            self._rows = list(new)
        else:
            assert self._mask is not None
            self._cache, self._mask = _merge_caches(self._cache, self._mask, cache, mask)
            self._rows.extend(new)
        self._trim()

    def _classify(self, new: list[_Row], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Request-level routing: the rows left to the routers get the classifier's weights
        for their whole generation (pinned, weighted or restricted requests keep theirs)."""
        if self.adapter.classify is None:
            return
        todo = [i for i, r in enumerate(new) if r.routing == ROUTED]
        if not todo:
            return
        idx = torch.tensor(todo, dtype=torch.long)
        probs, weights = self.adapter.classify(ids.index_select(0, idx),
                                               mask.index_select(0, idx))
        for j, i in enumerate(todo):
            new[i].routing = RowRouting(weights=tuple(float(w) for w in weights[j]))
            new[i].request_probs = {c: round(float(p), 6) for c, p in
                                    zip(self.adapter.request_classes, probs[j], strict=True)}

    def _banned(self, r: _Row) -> tuple[int, ...]:
        """Tokens the row may not pick yet: eos and stop token ids before ``min_tokens``."""
        p = r.req.params
        if len(r.generated) >= p.min_tokens:
            return ()
        return (*(() if p.ignore_eos else tuple(self.eos_ids)), *p.stop_token_ids)

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """One token per row, and (for rows that ask) its log probability and the best
        alternatives, from the raw logits of the forward the engine ran."""
        params = [r.req.params for r in rows]
        banned = [self._banned(r) for r in rows] if any(p.min_tokens for p in params) else None
        prompts = ([r.req.prompt_ids for r in rows]
                   if any(p.repetition_penalty != 1.0 for p in params) else None)
        tokens = sample_next(logits, params, [r.generator for r in rows],
                             [r.generated for r in rows], prompts, banned)
        asking = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if asking:
            k = max(params[i].logprobs or 0 for i in asking)
            entries = token_logprobs(logits[asking], [tokens[i] for i in asking], k)
            for i, (t, lp, top) in zip(asking, entries, strict=True):
                rows[i].logprobs.append((t, lp, top[:params[i].logprobs or 0]))
        return tokens

    def _decode(self) -> None:
        assert self._mask is not None
        rows = self._rows
        b = len(rows)
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long)
        mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], dim=1)
        pos = torch.tensor([[r.n_real] for r in rows], dtype=torch.long)
        logits, gates = self.adapter.forward(ids, mask, pos, self._cache,
                                             [r.routing for r in rows], self._decode_gates)
        self._mask = mask
        self.stats.decode_steps += 1
        self.stats.decode_rows += b
        self.stats.max_batch = max(self.stats.max_batch, b)
        if gates is not None:
            g = gates.float().cpu()[:, -1, :]
        for i, r in enumerate(rows):
            r.n_real += 1
            if gates is not None and r.gate_sum is not None:
                r.gate_sum += g[i]
                r.gate_tokens += 1
        tokens = self._sample(logits, rows)
        done = [i for i, (r, t) in enumerate(zip(rows, tokens, strict=True)) if self._accept(r, t)]
        self._drop(done)

    def _accept(self, r: _Row, token: int) -> bool:
        """Take the sampled token of a row; emit its text; True if the row is finished."""
        p = r.req.params
        if r.first_token_at is None:
            r.first_token_at = time.time()
        first = not r.generated
        if token in self.eos_ids and not p.ignore_eos:
            r.finish_reason = "stop"
        elif token in p.stop_token_ids:
            r.finish_reason = "stop"
        else:
            r.generated.append(token)
            self.stats.tokens_out += 1
            delta = r.tracker.add(token, check_stop=len(r.generated) >= p.min_tokens)
            if r.tracker.stopped:
                r.finish_reason = "stop"
            elif len(r.generated) >= p.max_tokens:
                r.finish_reason = "length"
            elif self.max_context is not None and r.n_real + 1 >= self.max_context:
                r.finish_reason = "length"
            if r.finish_reason is None:
                r.pending = token
                if delta or first:
                    r.sink(self._delta(r, delta, first))
                return False
            if delta:
                r.sink(self._delta(r, delta, first))
        last = r.tracker.finish()
        r.sink(Finished(self._result(r), last_delta=last))
        return True

    def _delta(self, r: _Row, text: str, first: bool) -> TokenDelta:
        """A text delta with the log probabilities not handed out yet."""
        ev = TokenDelta(text, 1, first=first)
        if r.logprobs is not None:
            ev.logprobs = r.logprobs[r.reported:]
            r.reported = len(r.logprobs)
        if r.prompt_logprobs is not None and not r.prompt_reported:
            ev.prompt_logprobs = r.prompt_logprobs
            r.prompt_reported = True
        return ev

    def _result(self, r: _Row) -> GenerationResult:
        gates = None
        if r.gate_sum is not None and r.gate_tokens and self.adapter.gate_names is not None:
            mean = (r.gate_sum / r.gate_tokens).tolist()
            gates = {n: round(float(v), 6)
                     for n, v in zip(self.adapter.gate_names, mean, strict=False)}
        now = time.time()
        info: dict[str, Any] = {
            "queue_s": round(max(0.0, r.admitted - r.req.arrival), 6),
            "ttft_s": round(max(0.0, (r.first_token_at or now) - r.req.arrival), 6),
            "engine_s": round(max(0.0, now - r.admitted), 6),
        }
        if self.adapter.version is not None:
            info["version"] = self.adapter.version
        if gates is not None:
            info["gates_over"] = self.gate_report
        info["routing"] = r.req.route().report()
        if r.request_probs is not None:
            info["classifier"] = r.request_probs
        return GenerationResult(
            text=r.tracker.text, finish_reason=r.finish_reason or "stop",
            prompt_tokens=len(r.req.prompt_ids), completion_tokens=len(r.generated),
            gates=gates, domain=r.req.domain, info=info, token_ids=list(r.generated),
            logprobs=list(r.logprobs) if r.logprobs is not None else None,
            prompt_logprobs=r.prompt_logprobs)

    def _drop(self, idx: Sequence[int]) -> None:
        if not idx:
            return
        gone = set(idx)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        t = torch.tensor(keep, dtype=torch.long)
        _select_rows(self._cache, t)
        assert self._mask is not None
        self._mask = self._mask.index_select(0, t)
        self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Cut leading time columns that no running row uses."""
        if self._mask is None or not self._mask.numel():
            return
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self._mask.shape[1]
        if start > 0:
            _trim_front(self._cache, start)
            self._mask = self._mask[:, start:]


# ------------------------------------------------------------------------------------ async


class RequestStream:
    """The events of one request, as an async iterator. Closing it early (the client went
    away) aborts the request in the engine."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self._engine = engine
        self.request_id = request_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def _put(self, ev: Event) -> None:
        self._queue.put_nowait(ev)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if isinstance(ev, (Finished, Failed)):
            self._done = True
        return ev

    def drain_nowait(self) -> list[Event]:
        """Events already queued (without waiting)."""
        out = []
        while not self._done:
            try:
                ev = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            out.append(ev)
            if isinstance(ev, (Finished, Failed)):
                self._done = True
        return out

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def result(self) -> GenerationResult:
        """Wait for the end; raises the engine's error if it failed."""
        try:
            async for ev in self:
                if isinstance(ev, Finished):
                    return ev.result
                if isinstance(ev, Failed):
                    raise ev.error
        finally:
            self.cancel()
        raise RuntimeError("the request stream ended without a result")


_thread_ids = itertools.count()


class AsyncEngine:
    """An :class:`EngineCore` stepped on its own thread, fed from an asyncio event loop."""

    def __init__(self, core: EngineCore):
        self.core = core
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"modula-engine-{next(_thread_ids)}")
        self._streams: dict[str, RequestStream] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def adapter(self) -> ModelAdapter:
        return self.core.adapter

    def submit(self, req: GenerationRequest, routing: RowRouting | int) -> RequestStream:
        """Queue a request (from the event loop); raises APIError for a request it refuses."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._ensure_loop()
        if req.request_id in self._streams:
            raise APIError(409, f"request id {req.request_id} is already running",
                           code="duplicate_request")
        stream = RequestStream(self, req.request_id)
        loop = self._loop
        assert loop is not None

        def sink(ev: Event, _s: RequestStream = stream) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(self._deliver, _s, ev)

        self.core.add(req, routing, sink)
        self._streams[req.request_id] = stream
        assert self._wake is not None
        self._wake.set()
        return stream

    def _deliver(self, stream: RequestStream, ev: Event) -> None:
        stream._put(ev)
        if isinstance(ev, (Finished, Failed)):
            self._streams.pop(stream.request_id, None)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.core.abort(request_id)
            if self._wake is not None:
                self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name="modula-engine-loop")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while not self._closed:
            if not self.core.has_work():
                self._wake.clear()
                if not self.core.has_work():
                    await self._wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, self.core.step)
            except Exception as exc:  # noqa: BLE001 - an engine bug: fail what is in flight
                log.exception("engine loop error")
                for s in list(self._streams.values()):
                    s._put(Failed(exc))
                self._streams.clear()
                await asyncio.sleep(0.05)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._streams or self.core.has_work():
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for s in list(self._streams.values()):
            s._put(Failed(RuntimeError("the engine was shut down")))
        self._streams.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def collect(stream: AsyncIterator[Event]) -> GenerationResult:
    """The result of a stream (for tests and the non-streaming path)."""
    async for ev in stream:
        if isinstance(ev, Finished):
            return ev.result
        if isinstance(ev, Failed):
            raise ev.error
    raise RuntimeError("the request stream ended without a result")
