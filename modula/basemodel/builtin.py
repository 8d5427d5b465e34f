"""The built-in tiny Llama base model: its architecture, its initialisation and where it is stored.

The built-in model is an ordinary ``LlamaForCausalLM`` built from ``model.tiny``
(:class:`~modula.config.schema.TinyModelConfig`) and the built-in tokenizer, pretrained by
``modula pretrain`` (:mod:`modula.trainers.pretrain`) and stored with ``save_pretrained`` under
``models/builtin-tiny/<fingerprint>/``; the fingerprint covers the tiny config, the tokenizer, the
general/code data and the pretraining settings, so any change builds a new model and an unchanged
config reuses the stored one. ``modula.json`` in that folder is written last and marks it complete.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from modula.config.schema import ModulaConfig, TinyModelConfig
from modula.data.build import (
    CORPUS_DOMAINS,
    builtin_domain_config,
    domain_fingerprint,
    tokenizer_fingerprint,
)
from modula.infra.layout import builtin_model_key
from modula.infra.storage import Storage

__all__ = [
    "MARKER",
    "build_model",
    "builtin_fingerprint",
    "builtin_info",
    "builtin_key",
    "llama_config",
]

# written last into the stored model's folder: its presence means the folder is complete
MARKER = "modula.json"


def llama_config(tiny: TinyModelConfig, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of the built-in model for this tokenizer (vocabulary and special ids)."""
    from transformers import LlamaConfig

    vocab = max(tiny.vocab_size, len(tokenizer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads or tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_model(tiny: TinyModelConfig, tokenizer: Any) -> Any:
    """A freshly initialised built-in model; the same ``tiny.seed`` gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(tiny, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def builtin_fingerprint(cfg: ModulaConfig) -> str:
    """What the pretrained built-in model depends on."""
    st = cfg.stages.pretrain
    spec = {
        "tiny": cfg.model.tiny.model_dump(mode="json"),
        "tokenizer": tokenizer_fingerprint(cfg),
        "data": [domain_fingerprint(builtin_domain_config(cfg, n)) for n in CORPUS_DOMAINS],
        "pretrain": st.model_dump(mode="json", include={
            "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "max_length", "seed"}),
        "max_length": cfg.model.max_length,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def builtin_key(cfg: ModulaConfig) -> str:
    """Where the built-in model of this config is stored."""
    return builtin_model_key(builtin_fingerprint(cfg))


def builtin_info(cfg: ModulaConfig, storage: Storage | None = None) -> dict[str, Any] | None:
    """The stored built-in model's record (size, perplexity before/after, time), or None."""
    storage = storage or Storage(cfg.storage)
    try:
        return json.loads(storage.read_text(f"{builtin_key(cfg)}/{MARKER}"))
    except FileNotFoundError:
        return None
