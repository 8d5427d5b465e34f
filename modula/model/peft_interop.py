"""PEFT interop: MoDULA experts that are plain LoRA adapters go out and come in as PEFT dirs.

A universal expert (any variant that has one) and a Flan or MoLoRA domain expert compute
``W0 x + s B A x`` on their own, exactly a PEFT LoRA adapter; a Res domain expert reads the
universal expert's output through a LeakyReLU and has no PEFT equivalent. Only safetensors
adapter files are read (``adapter_model.bin`` is a pickle and is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ModulaModel

__all__ = ["export_peft", "import_peft"]

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<side>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def export_peft(
    model: ModulaModel,
    expert_name: str,
    directory: str | os.PathLike[str],
    *,
    base_model_id: str | None = None,
) -> Path:
    """Write ``expert_name`` (``universal`` or a Flan/MoLoRA domain) as a PEFT LoRA adapter
    directory that ``PeftModel.from_pretrained(base_model, directory)`` loads."""
    from peft import LoraConfig

    cfg = model.modula_config
    if expert_name == "universal":
        if model.variant == "molora":
            raise ValueError("variant 'molora' has no universal expert")
        rank, scaling = cfg.universal_rank, cfg.universal_scaling
    else:
        if expert_name not in model.domains:
            raise ValueError(f"unknown expert {expert_name!r} (domains: {model.domains})")
        if model.variant == "res":
            raise ValueError(
                "a MoDULA-Res domain expert reads the universal expert's output through a "
                "LeakyReLU; it is not a LoRA adapter and cannot be exported to PEFT"
            )
        rank, scaling = cfg.domain_rank, cfg.domain_scaling
    layers = model.modula_layers()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, lyr in layers.items():
        e = lyr.expert_module(expert_name)
        tensors[f"base_model.model.{path}.lora_A.weight"] = e.A.detach().cpu().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = e.B.detach().cpu().contiguous()
    peft_cfg = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        target_modules=list(layers),
        fan_in_fan_out=any(lyr.is_conv1d for lyr in layers.values()),
        lora_dropout=cfg.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_id,
    )
    peft_cfg.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank/alpha pattern rule (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def import_peft(model: ModulaModel, adapter_dir: str | os.PathLike[str], domain_name: str) -> None:
    """Add a PEFT LoRA adapter as the new domain expert ``domain_name`` (Flan or MoLoRA).

    An adapter of lower rank is zero-padded to ``domain_rank``; PEFT's scaling is folded into
    ``B`` so the expert computes what PEFT computes. Layers the adapter does not target get a
    no-op expert. Everything is checked before the model changes."""
    if model.variant not in ("flan", "molora"):
        raise ValueError(
            f"variant {model.variant!r} cannot take a PEFT adapter as a domain expert "
            "(only Flan and MoLoRA domain experts are plain LoRA on x)"
        )
    if domain_name in model.domains:
        raise ValueError(f"domain {domain_name!r} already exists")
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ValueError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle and is not loaded)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    pcfg = json.loads(cfg_path.read_text())
    if pcfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {pcfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": pcfg.get("use_dora"),
        "bias": pcfg.get("bias", "none") != "none",
        "modules_to_save": pcfg.get("modules_to_save"),
        "lora_bias": pcfg.get("lora_bias"),
        "trainable_token_indices": pcfg.get("trainable_token_indices"),
        "target_parameters": pcfg.get("target_parameters"),
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(f"{adapter_dir}: LoRA features {bad} have no MoDULA equivalent")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: unreadable safetensors file ({exc})") from None
    layers = model.modula_layers()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A/B weight of a linear layer")
        if m["path"] not in layers:
            raise ValueError(
                f"{weights}: the adapter targets {m['path']!r}, which this model does not adapt "
                f"(adapted: {', '.join(list(layers)[:6])}...)"
            )
        pairs.setdefault(m["path"], {})[m["side"]] = t
    if not pairs:
        raise ValueError(f"{weights}: no LoRA weights found")
    rank = model.modula_config.domain_rank
    ours = model.modula_config.domain_scaling
    prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: {path} lacks lora_{'B' if 'A' in ab else 'A'}")
        A, B = ab["A"].float(), ab["B"].float()
        lyr = layers[path]
        r = A.shape[0]
        if A.shape != (r, lyr.in_features) or B.shape != (lyr.out_features, r):
            raise ValueError(
                f"{weights}: {path} has A {tuple(A.shape)}, B {tuple(B.shape)}; the layer is "
                f"{lyr.in_features} -> {lyr.out_features}"
            )
        if r > rank:
            raise ValueError(
                f"{weights}: {path} has rank {r} > domain_rank {rank}; attach with domain_rank >= {r}"
            )
        r_cfg = _pattern_value(pcfg.get("rank_pattern") or {}, path, pcfg.get("r", r))
        alpha = _pattern_value(pcfg.get("alpha_pattern") or {}, path, pcfg.get("lora_alpha", r_cfg))
        theirs = alpha / math.sqrt(r_cfg) if pcfg.get("use_rslora") else alpha / r_cfg
        A_pad = A.new_zeros(rank, A.shape[1])
        B_pad = B.new_zeros(B.shape[0], rank)
        A_pad[:r] = A
        B_pad[:, :r] = B * (theirs / ours)
        prepared[path] = (A_pad, B_pad)
    model.add_domain(domain_name)
    with torch.no_grad():
        for path, lyr in layers.items():
            e = lyr.experts[domain_name]
            if path in prepared:
                A_pad, B_pad = prepared[path]
                e.A.copy_(A_pad.to(e.A.dtype))
                e.B.copy_(B_pad.to(e.B.dtype))
