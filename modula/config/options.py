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

