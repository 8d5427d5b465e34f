"""The frozen base model: the built-in tiny Llama (built, fingerprinted, stored by ``modula
pretrain``) and resolving / loading ``model.base`` whatever it names (the built-in model, a local
Hugging Face directory, an ``s3://`` prefix)."""

from modula.basemodel.builtin import (
    MARKER,
    build_model,
    builtin_fingerprint,
    builtin_info,
    builtin_key,
    llama_config,
)
from modula.basemodel.loading import (
    BaseModelMissing,
    ContextTooLong,
    check_base_model,
    count_parameters,
    load_base_model,
    load_base_tokenizer,
    resolve_base_dir,
)

__all__ = [
    "MARKER",
    "BaseModelMissing",
    "ContextTooLong",
    "build_model",
    "builtin_fingerprint",
    "builtin_info",
    "builtin_key",
    "check_base_model",
    "count_parameters",
    "llama_config",
    "load_base_model",
    "load_base_tokenizer",
    "resolve_base_dir",
]
