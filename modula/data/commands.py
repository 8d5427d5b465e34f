"""`modula data build`: write every configured domain's splits (and the built-in tokenizer) to
``storage.root``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.data.build import build_data, ensure_tokenizer
from modula.infra.layout import DATA
from modula.infra.storage import Storage

__all__ = ["build_cmd", "datasets_table", "register"]

_SPLITS = ("train", "validation", "test", "corpus")


def datasets_table(title: str) -> tuple[Table, Any]:
    """The table ``data build`` fills, and the function that adds one domain's manifest."""
    table = Table(title=title, caption="groups: distinct source groups in train / validation / "
                                       "test (no group is in two splits)")
    table.add_column("domain", overflow="fold")
    table.add_column("source", overflow="fold")
    for col in ("train", "valid", "test", "corpus"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("groups", justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")

    def add(m: dict[str, Any]) -> None:
        c, g = m["counts"], m.get("groups", {})
        table.add_row(m["domain"], m["source"], *(str(c.get(s, "")) for s in _SPLITS),
                      "/".join(str(g.get(s, "")) for s in ("train", "validation", "test")),
                      "cached" if m.get("cached") else f"built in {m.get('seconds', 0):.1f}s")

    return table, add


def build_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only this domain (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the fingerprint matches.")] = False,
) -> None:
    """Build the domain datasets (parquet) and, for the built-in model, its tokenizer."""
    cfg = load_config(config, set_)
    console = Console()
    storage = Storage(cfg.storage)
    table, add = datasets_table(f"datasets in {storage.uri(DATA)}")
    t0 = time.time()
    with console.status("building datasets"):
        build_data(cfg, storage, domains=domain or None, force=force, on_domain=add)
        tok = ensure_tokenizer(cfg, storage, force=force) if cfg.model.is_builtin and not domain else None
    console.print(table)
    if tok:
        console.print(f"tokenizer: {storage.uri(tok)}")
    console.print(f"[green]data ready in {time.time() - t0:.1f}s[/]")


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Datasets: the built-in domain suite and user data.", no_args_is_help=True)
    data_app.command("build")(build_cmd)
    app.add_typer(data_app, name="data")
