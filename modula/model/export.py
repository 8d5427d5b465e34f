"""``modula export``: a published version's experts as files other tools load.

- ``peft``: one PEFT LoRA adapter directory per expert that is a plain LoRA (the universal
  expert, Flan and MoLoRA domain experts): ``PeftModel.from_pretrained(base, DIR/<expert>)``;
- ``merged``: one Hugging Face model directory, the base weights with one expert folded in
  (the universal expert, or a pinned Flan / MoLoRA domain), plus the tokenizer: vLLM or plain
  transformers serve it with no adapter code. It computes what ``modula:<domain>`` computes.

A MoDULA-Res domain expert reads the universal expert's output through a LeakyReLU: it is not
a LoRA adapter and not linear in x, so it can be neither exported to PEFT nor merged
(docs/method.md). Both use :mod:`modula.model.peft_interop` and :mod:`modula.model.merge`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modula.basemodel.loading import load_base_model, resolve_base_dir
from modula.config.schema import ModulaConfig
from modula.errors import ModulaError
from modula.infra.layout import published_name
from modula.infra.registry import Registry

from .files import load_modula
from .merge import merge_into_base
from .peft_interop import export_peft

__all__ = ["EXPORT_RECORD", "ExportError", "Exported", "export_model", "exportable"]

EXPORT_RECORD = "modula-export.json"
FORMATS = ("peft", "merged")


class ExportError(ModulaError):
    """What was asked cannot be exported (a Res domain expert, an unknown expert, ...)."""


@dataclass
class Exported:
    """What ``export_model`` wrote."""

    model: str
    version: int
    format: str
    directory: Path
    experts: dict[str, Path] = field(default_factory=dict)  # expert -> its directory


def exportable(variant: str, domains: list[str]) -> list[str]:
    """The experts of a model that are plain LoRA adapters, in order."""
    out = [] if variant == "molora" else ["universal"]
    if variant in ("flan", "molora"):
        out += list(domains)
    return out


def _why_not(variant: str, domains: list[str], expert: str, fmt: str) -> str | None:
    known = (["universal"] if variant != "molora" else []) + list(domains)
    if expert not in known:
        return f"unknown expert {expert!r} (experts: {', '.join(known)})"
    if expert != "universal" and variant == "res":
        what = "merged into the base weights" if fmt == "merged" else "exported to PEFT"
        return (f"{expert!r} is a MoDULA-Res domain expert: it reads the universal expert's "
                f"output through a LeakyReLU, so it is not a LoRA adapter and cannot be {what}; "
                f"serve it pinned ('<model>:{expert}'), or export 'universal'")
    return None


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty folder: give a new one")


def export_model(cfg: ModulaConfig, dest: str | Path, *, fmt: str = "peft",
                 experts: list[str] | None = None, name: str | None = None,
                 version: int | None = None) -> Exported:
    """Export a published version (default: the latest of the config's model) to `dest`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not allowed (allowed: {', '.join(FORMATS)})")
    dest = Path(dest)
    _check_dest(dest)
    registry = Registry.from_config(cfg)
    rname = published_name(cfg, None, name)
    mv = registry.show(rname, version)
    variant = mv.variant or cfg.modula.variant
    domains = list(mv.metadata.get("domains") or mv.domains())
    if fmt == "merged":
        if not experts or len(experts) != 1:
            raise ExportError("--format merged folds exactly one expert into the base: give "
                              "--expert universal or --expert <domain>")
    chosen = experts or exportable(variant, domains)
    for e in chosen:
        why = _why_not(variant, domains, e, fmt)
        if why:
            raise ExportError(why)
    if not chosen:
        raise ExportError(f"{rname} v{mv.version} has no expert that is a LoRA adapter")
    base_dir = resolve_base_dir(cfg)
    with tempfile.TemporaryDirectory(prefix="modula-export-") as tmp:
        local = registry.fetch(rname, mv.version, Path(tmp) / "version")
        base, tokenizer = load_base_model(cfg)
        model = load_modula(base, local.path)
    out = Exported(rname, mv.version, fmt, dest)
    dest.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"model": rname, "version": mv.version, "format": fmt,
                              "variant": variant, "base_model": cfg.model.base,
                              "base_model_dir": str(base_dir), "experts": {}}
    if fmt == "peft":
        for e in chosen:
            path = export_peft(model, e, dest / e, base_model_id=str(base_dir))
            out.experts[e] = path
    else:
        (e,) = chosen
        merged = merge_into_base(model, e)
        merged.save_pretrained(str(dest), safe_serialization=True)
        tokenizer.save_pretrained(str(dest))
        out.experts[e] = dest
    for e in chosen:
        entry = mv.experts.get(e)
        record["experts"][e] = {"path": str(out.experts[e].relative_to(dest)) or ".",
                                "sha256": entry.sha256 if entry else None}
    (dest / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out
