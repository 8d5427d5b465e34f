"""`modula demo`: the main job end to end on the embedded default.

Each step is a function that later capabilities extend; the demo prints what it does as it goes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def run_demo(config: Path | None, sets: list[str] | None) -> None:
    from modula.cli import _print_resources, load_or_exit
    from modula.cluster.connect import ray_session

    t0 = time.time()
    console.rule("[bold]modula demo")
    cfg = load_or_exit(config, sets)
    console.print(
        f"config valid: variant={cfg.modula.variant}, base={cfg.model.base}, "
        f"experts={cfg.expert_domains()}, storage={cfg.storage.root}"
    )
    console.rule("Ray")
    with ray_session(cfg.cluster) as resources:
        _print_resources(cfg, resources)
    console.rule(f"[green]demo finished in {time.time() - t0:.0f}s")


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    ) -> None:
        """Run the main job end to end on the config (default: the embedded default)."""
        run_demo(config, set_)
