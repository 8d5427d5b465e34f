"""Which linear layers of a HF causal LM get a MoDULA layer.

The paper leaves the targets open (docs/method.md); ours are all linear projections of the
attention and MLP blocks. Names are matched like PEFT does (a module matches a target if its
dotted path equals the target or ends with ``.target``), so the same lists work for PEFT export.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "default_targets", "find_targets", "is_adaptable", "linear_dims"]

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model_type (config.model_type) -> target module names
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    # Phi-3 fuses q/k/v and gate/up into one projection each
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D layers (weight is in x out)
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def is_adaptable(module: nn.Module) -> bool:
    """A MoDULA layer can wrap ``nn.Linear`` and GPT-2's ``Conv1D``."""
    conv = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a Conv1D (whose weight is in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    return w.shape[0], w.shape[1]


def _output_head_names(model: nn.Module) -> set[str]:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
    return {name for name, m in model.named_modules() if head is not None and m is head}


def default_targets(model: nn.Module) -> list[str]:
    """The family default for ``model`` (by ``config.model_type``); for an unknown family, every
    adaptable layer except the output head, by its last name component."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    heads = _output_head_names(model)
    names: list[str] = []
    for name, module in model.named_modules():
        if name and name not in heads and is_adaptable(module):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Dotted paths of the modules to adapt, in model order. Raises ``ValueError`` naming the
    targets that match nothing (or only non-linear modules) and the model's linear layers."""
    heads = _output_head_names(model)
    found: list[str] = []
    matched: dict[str, bool] = {t: False for t in targets}
    non_linear: dict[str, list[str]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        if not name:
            continue
        hits = [t for t in targets if _matches(name, t)]
        if not hits:
            continue
        if is_adaptable(module) and name not in heads:
            found.append(name)
            for t in hits:
                matched[t] = True
        else:
            kind = "the output head" if name in heads else type(module).__name__
            for t in hits:
                non_linear[t].append(f"{name} ({kind})")
    missing = [t for t, ok in matched.items() if not ok]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_adaptable(m)}
        )
        details = "; ".join(
            f"{t!r} matches only {', '.join(non_linear[t][:3])}"
            for t in missing
            if non_linear[t]
        )
        raise ValueError(
            f"target_modules {missing} match no linear layer of {type(model).__name__}"
            + (f" ({details})" if details else "")
            + f"; its linear layers are named: {', '.join(linear) or 'none'}"
        )
    return found
