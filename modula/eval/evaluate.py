"""Evaluating a model on the domains: any Hugging Face causal LM (the base-model row) or a
MoDULA model (``ModulaModel``: a ``forward`` returning logits and a working ``.generate()``).

Per domain:

- ``perplexity``: response perplexity (prompt tokens masked), every domain;
- ``exact_match``: greedy generation, the answer checked by :func:`~modula.eval.metrics.exact_match`;
- ``accuracy``: the label with the highest likelihood among the domain's labels (the distinct
  answers of its train split), compared with the reference label.

``general`` is general ability: its held-out response perplexity. The domain average is the mean
score (%) over the scored domains that get an expert; ``domain_perplexity`` is the geometric mean
response perplexity over the expert domains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from modula.config import DomainConfig, ModulaConfig
from modula.data.encode import IGNORE_INDEX, collate, encode_example
from modula.data.tokenizer import render_prompt
from modula.eval.metrics import (
    accuracy,
    exact_match,
    geometric_mean,
    mean,
    perplexity,
)

__all__ = [
    "DomainResult",
    "VariantResult",
    "GateShares",
    "response_nll",
    "generate_responses",
    "choose_labels",
    "evaluate_domain",
    "evaluate_model",
    "collect_gate_shares",
    "label_set",
    "ROUTINGS",
    "Route",
    "finite",
    "Routing",
    "pinned_routing",
    "request_routing",
    "routing_for",
]


@dataclass
class DomainResult:
    domain: str
    metric: str
    n: int
    perplexity: float
    score: float | None = None  # exact match or accuracy, in %
    samples: list[dict[str, str]] = field(default_factory=list)  # a few predictions, for reading


@dataclass
class VariantResult:
    variant: str
    split: str
    domains: dict[str, DomainResult]
    general_perplexity: float | None
    domain_average: float | None
    domain_perplexity: float | None
    seconds: float
    model: str = ""
    # how a MoDULA model was routed: token | request | pinned ("" for models without experts)
    routing: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return finite(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantResult:
        doms = {k: DomainResult(**v) for k, v in d["domains"].items()}
        return cls(**{**d, "domains": doms})


def finite(obj: Any) -> Any:
    """JSON has no inf/nan: they become None."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


# The routing inputs of one batch: its prompts -> extra keyword arguments of the model's
# forward / generate (``expert_weights`` ...); see :func:`request_routing`.
Route = Callable[[list[str]], dict[str, Any]]
# The Route of each domain's batches (the pinned oracle differs per domain).
Routing = Callable[[str], Route | None]

ROUTINGS = ("token", "request", "pinned")


def request_routing(model: Any, tokenizer: Any, max_length: int,
                    top_k: int | None = None) -> Routing:
    """Route every batch by the model's request classifier: each row gets the classifier's
    gate weights for its own prompt (the prompt alone, as a serving replica sees it)."""
    import torch

    dev = _device(model)
    limit = max(1, max_length // 2)

    def route(prompts: list[str]) -> dict[str, Any]:
        enc = [{"input_ids": tokenizer(render_prompt(tokenizer, p),
                                       add_special_tokens=False)["input_ids"][-limit:]}
               for p in prompts]
        batch = collate(enc, tokenizer.pad_token_id)
        with torch.no_grad():
            probs = model.request_probs(batch["input_ids"].to(dev),
                                        batch["attention_mask"].to(dev))
        return {"expert_weights": model.request_weights(probs, top_k)}

    return lambda domain: route


def pinned_routing(model: Any) -> Routing:
    """The oracle: every row of a domain pinned to that domain's expert, ``general`` (or any
    domain without an expert) to the universal expert alone."""
    import torch

    names = list(model.expert_names)

    def for_domain(domain: str) -> Route:
        w = torch.zeros(len(names))
        if domain in names:
            w[names.index(domain)] = 1.0
        elif "universal" in names:
            w[names.index("universal")] = 1.0  # Flan; Res: all zero = the universal alone
        return lambda prompts: {"expert_weights": w.expand(len(prompts), -1)}

    return for_domain


def routing_for(model: Any, tokenizer: Any, how: str, max_length: int,
                top_k: int | None = None) -> Routing | None:
    """The :data:`Routing` of ``how``: ``token`` (the per-token routers, the paper), ``request``
    (the classifier) or ``pinned`` (the oracle). Models without experts take none."""
    if how not in ROUTINGS:
        raise ValueError(f"unknown routing {how!r} (allowed: {', '.join(ROUTINGS)})")
    if how == "token" or not getattr(model, "expert_names", None):
        return None
    if how == "request":
        return request_routing(model, tokenizer, max_length, top_k)
    return pinned_routing(model)


def _logits(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out[0]


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _token_nll(model: Any, batch: dict[str, Any], extra: dict[str, Any] | None = None
               ) -> tuple[Any, Any]:
    """Per-example summed NLL over label tokens, and the number of label tokens."""
    import torch
    import torch.nn.functional as F

    dev = _device(model)
    logits = _logits(model(input_ids=batch["input_ids"].to(dev),
                           attention_mask=batch["attention_mask"].to(dev), use_cache=False,
                           **(extra or {})))
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(dev)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    valid = labels != IGNORE_INDEX
    return (nll * valid).sum(1), valid.sum(1).to(torch.long)


def response_nll(model: Any, tokenizer: Any, records: list[dict[str, str]], max_length: int,
                 batch_size: int = 16, train_on_prompt: bool = False,
                 route: Route | None = None) -> tuple[float, int]:
    """(total negative log-likelihood, tokens) of the responses (+ eos) given their prompts."""
    import torch

    total, count = 0.0, 0
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], max_length, train_on_prompt)
               for r in records]
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            extra = route([r["prompt"] for r in records[start: start + batch_size]]) if route else None
            nll, n = _token_nll(model, collate(chunk, tokenizer.pad_token_id), extra)
            total += float(nll.sum())
            count += int(n.sum())
    return total, count


def generate_responses(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                       batch_size: int = 16, max_prompt_tokens: int | None = None,
                       route: Route | None = None) -> list[str]:
    """Greedy continuations of the chat-formatted prompts, special tokens removed."""
    import torch

    dev = _device(model)
    out: list[str] = []
    for chunk in _batches(prompts, batch_size):
        enc = []
        for p in chunk:
            ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            if max_prompt_tokens:
                ids = ids[-max_prompt_tokens:]
            enc.append({"input_ids": ids})
        batch = collate(enc, tokenizer.pad_token_id, side="left")
        with torch.no_grad():
            gen = model.generate(
                input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["attention_mask"].to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **(route(chunk) if route else {}),
            )
        new = gen[:, batch["input_ids"].shape[1]:]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def choose_labels(model: Any, tokenizer: Any, prompts: list[str], labels: list[str],
                  max_length: int, batch_size: int = 16, route: Route | None = None) -> list[str]:
    """For each prompt, the label whose response (label + eos) the model finds most likely."""
    import torch

    if not labels:
        raise ValueError("no labels to choose from")
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    scores = np.full((len(prompts), len(labels)), -np.inf)
    enc = [encode_example(tokenizer, prompts[i], labels[j], max_length) for i, j in pairs]
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            extra = route([prompts[i] for i, _ in pairs[start: start + batch_size]]) if route else None
            nll, _ = _token_nll(model, collate(enc[start: start + batch_size],
                                               tokenizer.pad_token_id), extra)
            for k, v in enumerate(nll.tolist()):
                i, j = pairs[start + k]
                scores[i, j] = -v
    return [labels[int(k)] for k in scores.argmax(1)]


def label_set(records: list[dict[str, str]]) -> list[str]:
    """The distinct answers of a label domain, sorted."""
    return sorted({r["answer"] or r["response"] for r in records})


def evaluate_domain(model: Any, tokenizer: Any, domain: DomainConfig, records: list[dict[str, str]],
                    max_length: int, max_new_tokens: int = 32, batch_size: int = 16,
                    labels: list[str] | None = None, n_samples: int = 3,
                    route: Route | None = None) -> DomainResult:
    """Response perplexity, plus the domain's metric when it is exact match or accuracy.
    ``route``: the per-batch routing inputs (see :data:`Route`); None = the model's own."""
    nll, n_tok = response_nll(model, tokenizer, records, max_length, batch_size, route=route)
    res = DomainResult(domain.name, domain.metric, len(records), perplexity(nll, n_tok))
    refs = [r.get("answer") or r["response"] for r in records]
    prompts = [r["prompt"] for r in records]
    if domain.metric == "exact_match":
        preds = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size,
                                   max_prompt_tokens=max_length - max_new_tokens, route=route)
        res.score = 100.0 * mean([float(exact_match(p, r)) for p, r in zip(preds, refs, strict=True)])
        res.samples = [{"prompt": p, "prediction": q, "answer": r}
                       for p, q, r in list(zip(prompts, preds, refs, strict=True))[:n_samples]]
    elif domain.metric == "accuracy":
        preds = choose_labels(model, tokenizer, prompts, labels or label_set(records), max_length,
                              batch_size, route=route)
        res.score = 100.0 * accuracy(preds, refs)
        res.samples = [{"prompt": p, "prediction": q, "answer": r}
                       for p, q, r in list(zip(prompts, preds, refs, strict=True))[:n_samples]]
    return res


def evaluate_model(model: Any, tokenizer: Any, cfg: ModulaConfig, records: dict[str, list[dict[str, str]]],
                   variant: str, split: str = "test", labels: dict[str, list[str]] | None = None,
                   on_domain: Callable[[DomainResult], None] | None = None,
                   model_name: str = "", routing: Routing | None = None) -> VariantResult:
    """Evaluate one model on every domain in `records` (name → rows, already limited).
    ``routing(domain)`` gives the :data:`Route` of that domain's batches (None: the model's
    own per-token routers)."""
    t0 = time.time()
    was_training = getattr(model, "training", False)
    model.eval()
    out: dict[str, DomainResult] = {}
    try:
        for name, rows in records.items():
            r = evaluate_domain(model, tokenizer, cfg.domain(name), rows, cfg.model.max_length,
                                cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                labels=(labels or {}).get(name),
                                route=routing(name) if routing else None)
            out[name] = r
            if on_domain:
                on_domain(r)
    finally:
        if was_training:
            model.train()
    experts = [d for d in cfg.expert_domains(include_reserved=True) if d in out]
    scored = [out[d].score for d in experts if out[d].score is not None]
    return VariantResult(
        variant=variant,
        split=split,
        domains=out,
        general_perplexity=out["general"].perplexity if "general" in out else None,
        domain_average=mean(scored) if scored else None,
        domain_perplexity=geometric_mean([out[d].perplexity for d in experts]) if experts else None,
        seconds=round(time.time() - t0, 1),
        model=model_name,
    )


# --------------------------------------------------------------------------------------------
# router gates


@dataclass
class GateShares:
    """Mean gate weight of each expert over each domain's tokens, per layer: [layers, domains, experts]."""

    layers: list[str]
    domains: list[str]
    experts: list[str]
    shares: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "domains": self.domains, "experts": self.experts,
                "shares": self.shares.round(6).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateShares:
        return cls(d["layers"], d["domains"], d["experts"], np.asarray(d["shares"], dtype=float))


def expert_names(model: Any, n_experts: int) -> list[str]:
    """Names of the gate columns: the model's expert order when it says so, else numbers."""
    for attr in ("expert_names", "domains"):
        names = getattr(model, attr, None)
        if names is not None and len(list(names)) == n_experts:
            return [str(x) for x in names]
    names = list(getattr(model, "domains", []) or [])
    if len(names) + 1 == n_experts:  # Flan: the universal expert is mixed in as well
        return ["universal", *map(str, names)]
    return [f"expert {i}" for i in range(n_experts)]


def collect_gate_shares(model: Any, tokenizer: Any, records: dict[str, list[dict[str, str]]],
                        max_length: int, batch_size: int = 16,
                        routing: Routing | None = None) -> GateShares:
    """Run each domain's records through a MoDULA model, capturing the router gates
    (``with model.capture_gates(): model(**batch)`` then ``model.gate_weights()`` →
    {layer: Tensor[batch, seq, experts]}), and average them over the real (unpadded) tokens."""
    import torch

    if not hasattr(model, "capture_gates"):
        raise TypeError(f"{type(model).__name__} has no router gates (capture_gates)")
    dev = _device(model)
    sums: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    layer_order: list[str] = []
    model.eval()
    for domain, rows in records.items():
        enc = [encode_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
        counts[domain] = 0
        route = routing(domain) if routing else None
        for start in range(0, len(enc), batch_size):
            batch = collate(enc[start: start + batch_size], tokenizer.pad_token_id)
            mask = batch["attention_mask"].bool()
            extra = route([r["prompt"] for r in rows[start: start + batch_size]]) if route else {}
            with torch.no_grad(), model.capture_gates():
                model(input_ids=batch["input_ids"].to(dev),
                      attention_mask=batch["attention_mask"].to(dev), use_cache=False, **extra)
            gates = model.gate_weights()
            for layer, g in gates.items():
                if layer not in layer_order:
                    layer_order.append(layer)
                g = g.detach().float().cpu()
                s = g[mask[:, : g.shape[1]]].sum(0)
                per = sums.setdefault(layer, {})
                per[domain] = per[domain] + s if domain in per else s
            counts[domain] += int(mask.sum())
    if not layer_order:
        raise RuntimeError("the model reported no gate weights")
    n_exp = int(next(iter(sums[layer_order[0]].values())).numel())
    domains = list(records)
    shares = np.zeros((len(layer_order), len(domains), n_exp))
    for li, layer in enumerate(layer_order):
        for di, d in enumerate(domains):
            if d in sums[layer] and counts[d]:
                shares[li, di] = (sums[layer][d] / counts[d]).numpy()
    return GateShares(layer_order, domains, expert_names(model, n_exp), shares)

