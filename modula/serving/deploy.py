"""Deploying the serving graph from a config: what will be served (checked before anything
starts), and the deployment itself on the configured Ray (``modula serve``, ``modula demo``)."""

from __future__ import annotations

from typing import Any

from ray import serve

from modula.basemodel import BaseModelMissing, check_base_model, resolve_base_dir
from modula.config.schema import ModulaConfig
from modula.errors import ModulaError
from modula.infra.connect import connect
from modula.infra.layout import registry_model_name
from modula.infra.registry import Registry, RegistryError
from modula.serving import topology
from modula.serving.app import build_graph, env_key_hashes

__all__ = ["DeploymentFailed", "PreflightError", "deploy", "preflight"]


class PreflightError(ModulaError, RuntimeError):
    """Something the service needs is missing; the message says what to do."""


class DeploymentFailed(ModulaError):
    """Ray Serve did not bring the application up; the message is Ray's last word on why."""


def preflight(cfg: ModulaConfig) -> dict[str, Any]:
    """Check, before deploying, that there is something to serve; returns what will be served."""
    try:
        base_dir = resolve_base_dir(cfg)
    except BaseModelMissing as exc:
        raise PreflightError(str(exc)) from None
    check_base_model(cfg)
    out: dict[str, Any] = {"base_dir": str(base_dir), "groups": topology.expert_groups(cfg),
                           "deployments": topology.expert_deployment_names(cfg)}
    if cfg.serve.base_only:
        out.update(version=None, domains=[], registry_model=None)
        return out
    name = registry_model_name(cfg)
    reg = Registry.from_config(cfg)
    try:
        version = reg.latest_version(name)
        if version is None:
            raise PreflightError(
                f"the registry in {cfg.storage.root} has no published version of {name!r}: "
                "train and publish it first (`modula train`), set serve.registry_model to the "
                "name it was published under, or serve the bare base model with "
                "--set serve.base_only=true")
        mv = reg.show(name, version)
    except RegistryError as exc:
        raise PreflightError(f"registry: {exc}") from None
    out.update(version=version, domains=mv.domains(), registry_model=name,
               variant=mv.variant)
    return out


def deploy(cfg: ModulaConfig, *, blocking: bool = False) -> str:
    """Connect to Ray, start Serve on ``serve.host:serve.port`` and run the application;
    returns the service's base URL once every deployment is healthy."""
    s = cfg.serve
    graph = build_graph(cfg, api_key_hashes=env_key_hashes())
    try:
        connect(cfg.cluster)
        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(graph, name=s.app_name, route_prefix=s.route_prefix, blocking=blocking)
    except ModulaError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's reasons (no cluster, a port in use, a
        # replica that cannot start) are the user's to fix: one readable line, no traceback
        raise DeploymentFailed(str(exc).strip().splitlines()[-1]) from exc
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    prefix = s.route_prefix.rstrip("/")
    return f"http://{host}:{s.port}{prefix}"
