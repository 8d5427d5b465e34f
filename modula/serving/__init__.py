"""Ray Serve graph: an OpenAI-compatible ingress, the request-level router and the expert
deployments; autoscaling from the config.

- :mod:`~modula.serving.app`: the deployments (``Ingress``, ``Router``, ``Experts``) and the
  builders (``build_app`` for ``import_path: modula.serving.app:build_app``, ``build_graph``);
- :mod:`~modula.serving.engine`: continuous batching over any HF causal LM (Ray-free);
- :mod:`~modula.serving.protocol`: the OpenAI wire format and its errors (Ray- and torch-free);
- :mod:`~modula.serving.modeling`: what a replica loads (base model, registry version);
- :mod:`~modula.serving.metrics`: the Prometheus metrics;
- :mod:`~modula.serving.topology`: deployment names, expert groups and each deployment's Serve
  options (also what ``modula render --target serve`` writes);
- :mod:`~modula.serving.deploy`: checking what will be served, and deploying it;
- :mod:`~modula.serving.commands`: ``modula serve``.

Importing this package imports neither Ray nor torch; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "APIError",
    "AsyncEngine",
    "EngineCore",
    "ModelAdapter",
    "build_app",
    "build_graph",
]

_LAZY = {
    "APIError": "modula.serving.protocol",
    "AsyncEngine": "modula.serving.engine",
    "EngineCore": "modula.serving.engine",
    "ModelAdapter": "modula.serving.engine",
    "build_app": "modula.serving.app",
    "build_graph": "modula.serving.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modula.serving' has no attribute {name!r}")
