"""Which base model families modula trains and serves, and which it refuses up front.

The serving engine (:mod:`modula.serving.engine`) batches requests over one key/value cache per
layer: a tensor (batch, heads, time, head_dim) per layer that it merges, cuts and trims along the
time axis, with the attention mask applying any sliding window. That holds for decoder-only
models whose every layer is full or sliding-window attention. A model whose layers keep another
state (a state-space or linear-attention recurrence, a convolution buffer), whose attention is
chunked, or that is not decoder-only, is refused before any work starts, with the reason: a
:class:`UnsupportedBaseModel`.

Checked end to end in the tests (tiny random configs: train, publish, serve): the families of
:data:`TESTED_FAMILIES`. Other decoder-only attention models are allowed, with every linear layer
but the output head as targets unless ``modula.target_modules`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modula.errors import ModulaError

__all__ = ["TESTED_FAMILIES", "UnsupportedBaseModel", "check_family"]

# model_type -> the family's name, as the README lists them
TESTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
}

# families whose layers carry a recurrent (state-space, linear-attention, RG-LRU) or
# convolution state; their configs do not always list it in `layer_types`
_STATEFUL: dict[str, str] = {
    "mamba": "state-space (Mamba) layers",
    "mamba2": "state-space (Mamba-2) layers",
    "falcon_mamba": "state-space (Mamba) layers",
    "falcon_h1": "state-space (Mamba-2) layers beside attention",
    "jamba": "state-space (Mamba) layers beside attention",
    "bamba": "state-space (Mamba-2) layers beside attention",
    "zamba": "state-space (Mamba) layers beside attention",
    "zamba2": "state-space (Mamba-2) layers beside attention",
    "granitemoehybrid": "state-space (Mamba-2) layers beside attention",
    "nemotron_h": "state-space (Mamba-2) layers beside attention",
    "recurrent_gemma": "recurrent (RG-LRU) layers",
    "rwkv": "recurrent (RWKV) layers",
    "xlstm": "recurrent (xLSTM) layers",
    "qwen3_next": "linear-attention (Gated DeltaNet) layers beside attention",
    "lfm2": "short-convolution layers beside attention",
    "lfm2_moe": "short-convolution layers beside attention",
}
_ATTENTION = ("full_attention", "sliding_attention")


class UnsupportedBaseModel(ModulaError, ValueError):
    """``model.base`` is of a family modula cannot serve (its attention or cache); the message
    names the family and why."""


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def check_family(config: Any, where: str = "model.base") -> str:
    """Refuse a base model whose attention or cache the serving engine cannot handle; returns
    its ``model_type``. ``config``: the model's ``config.json`` as a dict, or its config."""
    model_type = str(_get(config, "model_type") or "unknown")
    why = None
    if _get(config, "is_encoder_decoder"):
        why = "it is an encoder-decoder model; modula adapts decoder-only causal LMs"
    elif model_type in _STATEFUL:
        why = (f"it has {_STATEFUL[model_type]}, whose per-request state the serving engine's "
               "key/value cache cannot batch, merge or trim")
    else:
        other = sorted({t for t in (_get(config, "layer_types") or []) if t not in _ATTENTION})
        if other:
            why = (f"its layer types {', '.join(other)} are not full or sliding-window "
                   "attention; the serving engine's key/value cache holds only those")
    if why:
        raise UnsupportedBaseModel(f"{where}: the {model_type!r} family is not supported: "
                                   f"{why}")
    return model_type
