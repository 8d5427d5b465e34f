"""The name rules: which strings may name a domain, a model, a sweep. Compiled once; the schema
validates with the patterns, and storage keys and expert files use the same rules."""

from __future__ import annotations

import re

__all__ = [
    "DOMAIN_NAME",
    "DOMAIN_NAME_RE",
    "MODEL_NAME",
    "MODEL_NAME_RE",
    "SERVED_NAME",
    "SERVED_NAME_RE",
    "SWEEP_NAME",
    "RESERVED_EXPERT_NAMES",
    "expert_file",
]

# a domain names an expert file (domain-<name>.safetensors) and a router row
DOMAIN_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
# a model in the registry (registry/<name>/): the served name plus "-<variant>" for baselines
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# the name a service answers to (serve.model_name) and the row name of an evaluation result
SERVED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# a Ray Tune experiment under <storage.root>/tune/
SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

DOMAIN_NAME_RE = re.compile(DOMAIN_NAME)
MODEL_NAME_RE = re.compile(MODEL_NAME)
SERVED_NAME_RE = re.compile(SERVED_NAME)

# expert names that are not domains
RESERVED_EXPERT_NAMES = ("universal", "routers", "router", "classifier")


def expert_file(name: str) -> str:
    """The file of an expert in an experts folder or a workspace: ``universal.safetensors``,
    ``routers.safetensors``, ``classifier.safetensors`` (the request router),
    ``domain-<name>.safetensors``."""
    if name in ("universal", "routers", "classifier"):
        return f"{name}.safetensors"
    return f"domain-{name}.safetensors"
