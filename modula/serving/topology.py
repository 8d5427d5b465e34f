"""How the serving graph is laid out for a config: deployment names, expert groups and each
deployment's Ray Serve options (replicas, autoscaling, resources).

Shared by ``modula render --target serve`` (which writes these options into the Serve config)
and the Serve application builder, so the file a user deploys and the graph that runs always
agree. Ray-free.
"""

from __future__ import annotations

from typing import Any

from modula.config.schema import ModulaConfig

__all__ = [
    "BUILDER_IMPORT_PATH",
    "EXPERT_PREFIX",
    "INGRESS",
    "ROUTER",
    "deployment_options",
    "expert_deployment_names",
    "expert_groups",
]

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


def deployment_options(cfg: ModulaConfig) -> dict[str, dict[str, Any]]:
    """Per deployment name, in graph order (Ingress, Router, experts), its Serve options."""
    s = cfg.serve
    out: dict[str, dict[str, Any]] = {
        INGRESS: {"autoscaling_config": s.ingress_autoscaling.model_dump(exclude_none=True),
                  "ray_actor_options": {"num_cpus": 0.25}},
        ROUTER: {"autoscaling_config": s.router_autoscaling.model_dump(exclude_none=True),
                 "ray_actor_options": {"num_cpus": 0.25}},
    }
    for name in expert_deployment_names(cfg):
        out[name] = {
            "max_ongoing_requests": max(2 * s.batching.max_batch_size, 4),
            "autoscaling_config": s.autoscaling.model_dump(exclude_none=True),
            "ray_actor_options": {"num_cpus": s.resources.num_cpus,
                                  "num_gpus": s.resources.num_gpus,
                                  **({"resources": dict(s.resources.custom_resources)}
                                     if s.resources.custom_resources else {})},
        }
    return out
