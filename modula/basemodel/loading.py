"""Resolving and loading ``model.base``: the built-in model, a local Hugging Face directory or an
``s3://`` prefix, alike. Everything downstream (trainers, eval, serving) loads its base model
through :func:`load_base_model` / :func:`resolve_base_dir`."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modula.basemodel.builtin import MARKER, builtin_key
from modula.config.schema import ModulaConfig, StorageConfig
from modula.data.tokenizer import load_tokenizer
from modula.errors import ModulaError
from modula.infra.layout import BUILTIN_MODELS, cache_dir
from modula.infra.storage import Storage
from modula.model.families import check_family

__all__ = [
    "BaseModelMissing",
    "ContextTooLong",
    "check_base_model",
    "count_parameters",
    "load_base_model",
    "load_base_tokenizer",
    "resolve_base_dir",
]


class BaseModelMissing(ModulaError, FileNotFoundError):
    """The configured base model is not there (for the built-in one: not pretrained yet)."""


class ContextTooLong(ModulaError, ValueError):
    """A configured ``max_length`` is beyond the base model's context."""


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


def _download(st: Storage, key: str, marker: str) -> Path:
    """A local copy of a stored model directory, downloaded once per address and kept."""
    dest = cache_dir("cache", hashlib.sha256(st.uri(key).encode()).hexdigest()[:16])
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
                f"the built-in base model for this config is not in {storage.uri(BUILTIN_MODELS)} "
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


def check_base_model(cfg: ModulaConfig, storage: Storage | None = None) -> Any:
    """Before training or serving on ``model.base``: refuse a family whose attention or cache
    the serving engine cannot handle (:func:`~modula.model.families.check_family`) and a
    ``max_length`` beyond the model's ``max_position_embeddings``. Returns the model's
    config. (The built-in model's lengths are checked with the config itself.)"""
    from transformers import AutoConfig

    path = resolve_base_dir(cfg, storage)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                        trust_remote_code=cfg.model.trust_remote_code)
    check_family(config, where=f"model.base {cfg.model.base}")
    limit = getattr(config, "max_position_embeddings", None)
    for where, length in cfg.max_lengths().items():
        if limit and length > limit:
            raise ContextTooLong(f"{where}: {length} tokens is beyond the context of "
                                 f"model.base {cfg.model.base} (max_position_embeddings = "
                                 f"{limit})")
    return config


def load_base_tokenizer(cfg: ModulaConfig, storage: Storage | None = None) -> Any:
    """The tokenizer stored with ``model.base``."""
    return load_tokenizer(resolve_base_dir(cfg, storage))


def load_base_model(cfg: ModulaConfig, storage: Storage | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of ``model.base`` in ``model.dtype``, in eval mode, loaded locally."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_base_dir(cfg, storage)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, cfg.model.dtype), local_files_only=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.eval()
    return model, load_tokenizer(path)
