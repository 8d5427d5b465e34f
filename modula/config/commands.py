"""`modula validate`: check a config and print it resolved, secrets masked."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.errors import UsageError

__all__ = ["config_table", "register", "validate"]


def _flatten(d: object, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            key = v.get("name", i) if isinstance(v, dict) else i
            rows += _flatten(v, f"{prefix}.{key}")
    else:
        rows.append((prefix, yaml.safe_dump(d, default_flow_style=True).strip()
                     .removesuffix("...").strip()))
    return rows


def config_table(data: dict[str, object], title: str) -> Table:
    """A config as one row per field (``section.field``), values folded to the width."""
    table = Table(title=title, show_lines=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in _flatten(data):
        table.add_row(k, v)
    return table


def validate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table or yaml")] = "table",
) -> None:
    """Check a config and print it resolved (secrets masked)."""
    cfg = load_config(config, set_)
    data = cfg.to_data(secrets="mask")
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
        return
    if fmt != "table":
        raise UsageError(f"--format: {fmt!r} is not allowed (allowed: table, yaml)")
    console = Console()
    console.print(config_table(data, f"modula config: {config or 'embedded default'}"))
    console.print("[green]config is valid[/]")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
