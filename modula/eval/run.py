"""Running an evaluation from the config: which records, which model, where results go.

Models come from a *variant loader*: ``base`` (``model.base``: the built-in model, a local HF
directory or an s3:// prefix) is built in; the code that trains the MoDULA variants registers
``lora``, ``molora``, ``flan`` and ``res`` with :func:`register_variant_loader`. Any local HF
causal-LM directory can be evaluated too (``modula eval --model DIR --name NAME``), and trainers
can hand a model object straight to :func:`run_eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modula.basemodel import load_base_model
from modula.config.schema import ModulaConfig
from modula.data.build import ensure_data
from modula.data.io import read_records
from modula.data.tokenizer import load_tokenizer
from modula.errors import UnknownName
from modula.eval.evaluate import (
    DomainResult,
    GateShares,
    VariantResult,
    collect_gate_shares,
    evaluate_model,
    label_set,
    routing_for,
)
from modula.eval.report import EvalError, save_gate_shares, save_result
from modula.infra.layout import published_name, scratch_dir
from modula.infra.registry import Registry
from modula.infra.storage import Storage
from modula.model import load_modula

__all__ = [
    "VariantLoader",
    "register_variant_loader",
    "variant_loaders",
    "load_variant",
    "eval_records",
    "run_eval",
    "default_routing",
]

VariantLoader = Callable[[ModulaConfig, Storage], tuple[Any, Any]]


def _load_base(cfg: ModulaConfig, storage: Storage) -> tuple[Any, Any]:
    return load_base_model(cfg, storage)


def _published_loader(variant: str) -> VariantLoader:
    """A loader for the latest published version of `variant` in the registry."""

    def load(cfg: ModulaConfig, storage: Storage) -> tuple[Any, Any]:
        base, tok = load_base_model(cfg, storage)
        local = Registry(storage).fetch(published_name(cfg, variant), dest=scratch_dir("eval"))
        model = load_modula(base, local.path)
        model.eval()
        return model, tok

    return load


_LOADERS: dict[str, VariantLoader] = {
    "base": _load_base,
    **{v: _published_loader(v) for v in ("lora", "molora", "flan", "res")},
}


def register_variant_loader(name: str, loader: VariantLoader) -> None:
    """Make ``modula eval --variant NAME`` load its model with `loader(cfg, storage)` →
    (model, tokenizer)."""
    _LOADERS[name] = loader


def variant_loaders() -> dict[str, VariantLoader]:
    return dict(_LOADERS)


def load_variant(cfg: ModulaConfig, storage: Storage, name: str) -> tuple[Any, Any]:
    if name not in _LOADERS:
        raise UnknownName(
            f"no model loader for variant {name!r} (registered: {', '.join(sorted(_LOADERS))}); "
            "evaluate a model folder with --model DIR --name NAME instead"
        )
    return _LOADERS[name](cfg, storage)


def load_model_dir(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face causal-LM directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                 local_files_only=True)
    return model.eval(), load_tokenizer(path)


def eval_records(cfg: ModulaConfig, storage: Storage, split: str = "test",
                 domains: list[str] | None = None, limit: int | None = None
                 ) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[str]]]:
    """(rows per domain, the first ``eval.max_examples``; label sets of accuracy domains, from
    their train split)."""
    names = domains or [d.name for d in cfg.domains]
    n = limit or cfg.eval.max_examples
    rows = {d: read_records(storage, d, split, n) for d in names}
    labels = {d: label_set(read_records(storage, d, "train"))
              for d in names if cfg.domain(d).metric == "accuracy"}
    return rows, labels


def default_routing(cfg: ModulaConfig, model: Any) -> str:
    """How a model is routed unless told: the config's ``modula.router.granularity`` for a
    MoDULA model (flan, res), the per-token routers for the others."""
    if getattr(model, "variant", None) in ("flan", "res"):
        return cfg.modula.router.granularity
    return "token"


def run_eval(cfg: ModulaConfig, storage: Storage | None = None, variant: str = "base",
             model: Any = None, tokenizer: Any = None, split: str = "test",
             domains: list[str] | None = None, limit: int | None = None, gates: bool = True,
             on_domain: Callable[[DomainResult], None] | None = None, save: bool = True,
             model_name: str = "", routing: str | None = None
             ) -> tuple[VariantResult, GateShares | None]:
    """Evaluate one model on the configured domains and store its result (and gate shares when
    the model has routers) under ``reports/eval/``.

    ``routing``: ``token`` (the per-token routers), ``request`` (the request classifier) or
    ``pinned`` (the oracle: each domain on its own expert); default :func:`default_routing`.
    A result routed other than the default is named ``<variant>+<routing>``."""
    storage = storage or Storage(cfg.storage)
    ensure_data(cfg, storage, domains)
    if model is None:
        model, tokenizer = load_variant(cfg, storage, variant)
        model_name = model_name or (cfg.model.base if variant == "base" else variant)
    elif tokenizer is None:
        raise EvalError("a model was given without its tokenizer")
    how = routing or default_routing(cfg, model)
    try:
        route = routing_for(model, tokenizer, how, cfg.model.max_length,
                            cfg.modula.router.request_top_k)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    if route is not None and how == "request" and not getattr(model.request_router, "trained", False):
        raise EvalError(f"{variant} has no trained request classifier (published before request "
                        "routing existed?): evaluate with --routing token, or retrain the router "
                        "stage")
    if routing is not None and routing != default_routing(cfg, model):
        variant = f"{variant}+{routing}"
    rows, labels = eval_records(cfg, storage, split, domains, limit)
    result = evaluate_model(model, tokenizer, cfg, rows, variant, split, labels,
                            on_domain=on_domain, model_name=model_name, routing=route)
    result.routing = how if getattr(model, "expert_names", None) else ""
    shares = None
    if gates and hasattr(model, "capture_gates"):
        expert_rows = {d: r for d, r in rows.items() if d != "general"}
        shares = collect_gate_shares(model, tokenizer, expert_rows, cfg.model.max_length,
                                     cfg.eval.batch_size, routing=route)
    if save:
        save_result(storage, result)
        if shares is not None:
            save_gate_shares(storage, variant, shares)
    return result, shares
