"""The built-in tiny Llama base model, and resolving ``model.base`` to a model directory.

The built-in model is an ordinary ``LlamaForCausalLM`` built from ``model.tiny``
(:class:`~modula.cluster.config.TinyModelConfig`) and the built-in tokenizer, pretrained by
``modula pretrain`` (:mod:`modula.trainers.pretrain`) and stored with ``save_pretrained`` under
``models/builtin-tiny/<fingerprint>/``; the fingerprint covers the tiny config, the tokenizer, the
general/code data and the pretraining settings, so any change builds a new model and an unchanged
config reuses the stored one. ``modula.json`` in that folder is written last and marks it complete.

Everything downstream calls :func:`load_base_model` / :func:`resolve_base_dir`, which treat the
built-in model, a local HF directory and an ``s3://`` prefix alike.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modula.config import ModulaConfig, StorageConfig, TinyModelConfig
from modula.infra.storage import Storage

__all__ = [
    "BUILTIN_PREFIX",
    "MARKER",
    "llama_config",
    "build_model",
    "count_parameters",
    "builtin_fingerprint",
    "builtin_key",
    "builtin_info",
    "resolve_base_dir",
    "load_base_model",
    "load_base_tokenizer",
    "BaseModelMissing",
]

BUILTIN_PREFIX = "models/builtin-tiny"
MARKER = "modula.json"


class BaseModelMissing(FileNotFoundError):
    """The configured base model is not there (for the built-in one: not pretrained yet)."""


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


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def builtin_fingerprint(cfg: ModulaConfig) -> str:
    """What the pretrained built-in model depends on."""
    from modula.data.build import (
        CORPUS_DOMAINS,
        builtin_domain_config,
        domain_fingerprint,
        tokenizer_fingerprint,
    )

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
    return f"{BUILTIN_PREFIX}/{builtin_fingerprint(cfg)[:16]}"


def builtin_info(cfg: ModulaConfig, storage: Storage | None = None) -> dict[str, Any] | None:
    """The stored built-in model's record (size, perplexity before/after, time), or None."""
    storage = storage or Storage(cfg.storage)
    try:
        return json.loads(storage.read_text(f"{builtin_key(cfg)}/{MARKER}"))
    except FileNotFoundError:
        return None


def _cache_dir(uri: str) -> Path:
    return Path(tempfile.gettempdir()) / "modula-cache" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _download(st: Storage, key: str, marker: str) -> Path:
    """A local copy of a stored model directory, downloaded once per address and kept."""
    dest = _cache_dir(st.uri(key))
    if (dest / marker).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + "-", dir=dest.parent))
    st.download_dir(key, tmp)
    if not (tmp / marker).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise BaseModelMissing(f"{st.uri(key)} has no {marker}: not a model directory")
    try:
        tmp.rename(dest)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_base_dir(cfg: ModulaConfig, storage: Storage | None = None) -> Path:
    """A local directory holding the base model (and its tokenizer), downloading from S3 once."""
    base = cfg.model.base
    if cfg.model.is_builtin:
        storage = storage or Storage(cfg.storage)
        key = builtin_key(cfg)
        if not storage.exists(f"{key}/{MARKER}"):
            raise BaseModelMissing(
                f"the built-in base model for this config is not in {storage.uri(BUILTIN_PREFIX)} "
                "yet: run `modula pretrain` first"
            )
        if storage.is_s3:
            return _download(storage, key, MARKER)
        return Path(storage.uri(key))
    if base.startswith("s3://"):
        sc = cfg.storage
        st = Storage(StorageConfig(root=base, endpoint=sc.endpoint, region=sc.region,
                                   access_key_id=sc.access_key_id,
                                   secret_access_key=sc.secret_access_key))
        return _download(st, "", "config.json")
    p = Path(base).expanduser()
    if not (p / "config.json").is_file():
        raise BaseModelMissing(f"{p} is not a Hugging Face model directory (no config.json)")
    return p


def load_base_tokenizer(cfg: ModulaConfig, storage: Storage | None = None) -> Any:
    from modula.data.tokenizer import load_tokenizer

    return load_tokenizer(resolve_base_dir(cfg, storage))


def load_base_model(cfg: ModulaConfig, storage: Storage | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of ``model.base`` in ``model.dtype``, in eval mode, loaded locally."""
    import torch
    from transformers import AutoModelForCausalLM

    from modula.data.tokenizer import load_tokenizer

    path = resolve_base_dir(cfg, storage)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, cfg.model.dtype), local_files_only=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.eval()
    return model, load_tokenizer(path)
