"""The options every command shares: ``--config FILE`` and ``--set a.b.c=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ConfigOpt", "SetOpt"]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The config YAML (default: configs/default.yaml)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: --set stages.router.lr=1e-3 (repeatable)."),
]


def load_or_exit(config: Path | None, sets: list[str] | None):
    """Load the config or print its problems and exit 2."""
    from rich.console import Console

    from modula.config.loader import ConfigError, load_config

    try:
        return load_config(config, sets or [])
    except ConfigError as exc:
        err = Console(stderr=True, soft_wrap=True)
        src = f" {exc.source}" if exc.source else ""
        err.print(f"[bold red]invalid config{src}[/]", highlight=False)
        for p in exc.problems:
            err.print(f"  {p}", highlight=False, markup=False)
        raise typer.Exit(2) from None
