"""How the serving graph is laid out for a config: deployment names and expert groups.

Shared by `modula render --target serve` and the Serve application builder, so the file a user
deploys and the graph that runs always agree.
"""

from __future__ import annotations

from modula.config import ModulaConfig

INGRESS = "Ingress"
ROUTER = "Router"
EXPERT_PREFIX = "Experts"
BUILDER_IMPORT_PATH = "modula.serving.app:build_app"


def expert_groups(cfg: ModulaConfig) -> list[list[str]]:
    """Domains per expert deployment: all in one by default, else chunks of
    ``serve.experts_per_deployment`` in router order."""
    domains = cfg.expert_domains(include_reserved=True)
    size = cfg.serve.experts_per_deployment or max(1, len(domains))
    return [domains[i:i + size] for i in range(0, len(domains), size)] or [[]]


def expert_deployment_names(cfg: ModulaConfig) -> list[str]:
    groups = expert_groups(cfg)
    if len(groups) == 1:
        return [EXPERT_PREFIX]
    return [f"{EXPERT_PREFIX}{i}" for i in range(len(groups))]
