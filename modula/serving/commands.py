"""``modula serve``: deploy the OpenAI-compatible serving graph from the config and the registry."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from ray import serve
from rich.console import Console

from modula.config.loader import load_config
from modula.config.schema import ModulaConfig
from modula.serving.deploy import deploy, preflight

__all__ = ["register", "run_serve"]

console = Console()


def run_serve(config: Path | None, sets: list[str] | None, detach: bool) -> None:
    """Check what will be served, deploy it, and (unless `detach`) wait for Ctrl-C."""
    cfg = load_config(config, sets)
    info = preflight(cfg)
    what = ("the bare base model (serve.base_only)" if info["version"] is None else
            f"{info['registry_model']} v{info['version']} ({info.get('variant')}, domains: "
            f"{', '.join(info['domains']) or 'none'})")
    console.print(f"serving {what} on {cfg.model.base}")
    if len(info["deployments"]) > 1:
        for name, group in zip(info["deployments"], info["groups"], strict=True):
            console.print(f"  {name}: {', '.join(group)}")
    t0 = time.time()
    url = deploy(cfg)
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


def _wait_for_interrupt(cfg: ModulaConfig) -> None:
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
