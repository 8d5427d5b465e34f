"""``modula serve``: deploy the OpenAI-compatible serving graph from the config and the registry."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class PreflightError(RuntimeError):
    """Something the service needs is missing; the message says what to do."""


def preflight(cfg: Any) -> dict[str, Any]:
    """Check, before deploying, that there is something to serve; returns what will be served."""
    from modula.model.builtin import BaseModelMissing, resolve_base_dir
    from modula.serving import topology
    from modula.serving.modeling import registry_model_name

    try:
        base_dir = resolve_base_dir(cfg)
    except BaseModelMissing as exc:
        raise PreflightError(str(exc)) from None
    out: dict[str, Any] = {"base_dir": str(base_dir), "groups": topology.expert_groups(cfg),
                           "deployments": topology.expert_deployment_names(cfg)}
    if cfg.serve.base_only:
        out.update(version=None, domains=[], registry_model=None)
        return out
    from modula.infra.registry import Registry, RegistryError

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


def deploy(cfg: Any, *, blocking: bool = False) -> str:
    """Connect to Ray, start Serve on ``serve.host:serve.port`` and run the application;
    returns the service's base URL."""
    from ray import serve

    from modula.infra.connect import connect
    from modula.serving.app import build_graph, env_key_hashes

    connect(cfg.cluster)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_graph(cfg, api_key_hashes=env_key_hashes()), name=s.app_name,
              route_prefix=s.route_prefix, blocking=blocking)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    prefix = s.route_prefix.rstrip("/")
    return f"http://{host}:{s.port}{prefix}"


def run_serve(config: Path | None, sets: list[str] | None, detach: bool) -> None:
    from modula.cli import load_or_exit

    cfg = load_or_exit(config, sets)
    try:
        info = preflight(cfg)
    except PreflightError as exc:
        err_console.print(f"[bold red]cannot serve[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
    what = ("the bare base model (serve.base_only)" if info["version"] is None else
            f"{info['registry_model']} v{info['version']} ({info.get('variant')}, domains: "
            f"{', '.join(info['domains']) or 'none'})")
    console.print(f"serving {what} on {cfg.model.base}")
    if len(info["deployments"]) > 1:
        for name, group in zip(info["deployments"], info["groups"], strict=True):
            console.print(f"  {name}: {', '.join(group)}")
    t0 = time.time()
    try:
        url = deploy(cfg)
    except Exception as exc:  # noqa: BLE001 - one readable line, not a Ray traceback
        err_console.print(f"[bold red]deployment failed[/]: {str(exc).strip().splitlines()[-1]}",
                          highlight=False)
        raise typer.Exit(1) from None
    keyed = bool(cfg.serve.api_keys or os.environ.get("MODULA_API_KEYS"))
    console.print(f"[green]ready[/] in {time.time() - t0:.0f}s: {url}/v1 "
                  f"(model {cfg.serve.model_name!r}, or '{cfg.serve.model_name}:<domain>')"
                  + ("; API key required" if keyed else ""))
    console.print(f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
                  + ("-H 'Authorization: Bearer $KEY' " if keyed else "")
                  + f"-d '{{\"model\": \"{cfg.serve.model_name}\", \"prompt\": \"Hello\"}}'")
    console.print(f"  metrics: {url}/metrics")
    if detach:
        console.print(f"detached: the application {cfg.serve.app_name!r} keeps running on the "
                      "cluster (`serve shutdown` or `serve delete` stops it)")
        return
    _wait_for_interrupt(cfg)


def _wait_for_interrupt(cfg: Any) -> None:
    from ray import serve

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print("press Ctrl-C to stop")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopping ...")
        try:
            serve.delete(cfg.serve.app_name)
        finally:
            if cfg.cluster.is_local:
                serve.shutdown()


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Annotated[Path | None, typer.Option("--config", "-c",
                                                    help="The config YAML.")] = None,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help="Override a field: --set serve.port=8080 (repeatable).")] = None,
        detach: Annotated[bool, typer.Option(
            "--detach", help="Deploy and return; the service keeps running on the cluster.")
        ] = False,
    ) -> None:
        """Deploy the OpenAI-compatible endpoint (Ingress -> Router -> experts) on Ray Serve,
        serving the registry's latest version; new versions are picked up live."""
        run_serve(config, set_, detach)
