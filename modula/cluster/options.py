"""The options every command shares (``--config``, ``--set``) and loading the config at the
edge of a command: a bad config prints one line per problem and exits 2, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modula.cluster.config import ConfigError, ModulaConfig, load_config

__all__ = ["ConfigOpt", "SetOpt", "load_or_exit"]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The config YAML (default: configs/default.yaml)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: --set stages.router.lr=1e-3 (repeatable)."),
]


def load_or_exit(config: Path | None, sets: list[str] | None) -> ModulaConfig:
    """Load the config or print its problems and exit 2."""
    try:
        return load_config(config, sets or [])
    except ConfigError as exc:
        err = Console(stderr=True, soft_wrap=True)
        src = f" {exc.source}" if exc.source else ""
        err.print(f"[bold red]invalid config{src}[/]", highlight=False)
        for p in exc.problems:
            err.print(f"  {p}", highlight=False, markup=False)
        raise typer.Exit(2) from None
