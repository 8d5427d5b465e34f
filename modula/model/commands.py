"""``modula export``: a published version's experts as PEFT adapters or a merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.model.export import Exported, export_model

__all__ = ["export_cmd", "export_table", "register"]


def export_table(res: Exported) -> Table:
    """What ``modula export`` wrote, one row per expert."""
    t = Table(title=f"{res.model} v{res.version} ({res.format})")
    t.add_column("expert", no_wrap=True)
    t.add_column("directory", overflow="fold")
    for e, path in res.experts.items():
        t.add_row(e, str(path))
    return t


def export_cmd(
    dest: Annotated[Path, typer.Argument(help="A new (or empty) folder.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="peft | merged")] = "peft",
    expert: Annotated[list[str] | None, typer.Option(
        "--expert", "-e", help="universal or a domain (repeatable; peft default: every expert "
                               "that is a LoRA adapter; merged: exactly one).")] = None,
    name: Annotated[str | None, typer.Option(help="Registry name (default: serve.model_name).")
                    ] = None,
    version: Annotated[int | None, typer.Option("--version", "-v", help="Default: latest.")
                       ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export a published version: PEFT LoRA adapter directories (universal, Flan / MoLoRA
    domains) or a merged Hugging Face model (one expert folded into the base weights)."""
    cfg = load_config(config, set_)
    res = export_model(cfg, dest, fmt=fmt, experts=expert or None, name=name, version=version)
    Console().print(export_table(res))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
