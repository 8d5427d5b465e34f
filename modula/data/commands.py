"""`modula data build`: write every configured domain's splits (and the built-in tokenizer) to
``storage.root``."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modula.config.options import ConfigOpt, SetOpt


def build_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only this domain (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the fingerprint matches.")] = False,
) -> None:
    """Build the domain datasets (parquet) and, for the built-in model, its tokenizer."""
    from modula.cli import load_or_exit
    from modula.data.build import build_data, ensure_tokenizer
    from modula.data.userdata import UserDataError
    from modula.infra.storage import Storage

    cfg = load_or_exit(config, set_)
    console = Console()
    storage = Storage(cfg.storage)
    table = Table(title=f"datasets in {storage.uri('data')}")
    for col in ("domain", "source", "train", "validation", "test", "corpus", "groups (tr/va/te)", "status"):
        table.add_column(col, justify="right" if col in ("train", "validation", "test", "corpus") else "left")
    t0 = time.time()

    def row(m: dict) -> None:
        c, g = m["counts"], m.get("groups", {})
        table.add_row(m["domain"], m["source"], *(str(c.get(s, "")) for s in ("train", "validation", "test", "corpus")),
                      "/".join(str(g.get(s, "")) for s in ("train", "validation", "test")),
                      "cached" if m.get("cached") else f"built in {m.get('seconds', 0):.1f}s")

    try:
        with console.status("building datasets"):
            build_data(cfg, storage, domains=domain or None, force=force, on_domain=row)
            tok = ensure_tokenizer(cfg, storage, force=force) if cfg.model.is_builtin and not domain else None
    except (UserDataError, KeyError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]error[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(table)
    if tok:
        console.print(f"tokenizer: {storage.uri(tok)}")
    console.print(f"[green]data ready in {time.time() - t0:.1f}s[/]")


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Datasets: the built-in domain suite and user data.", no_args_is_help=True)
    data_app.command("build")(build_cmd)
    app.add_typer(data_app, name="data")
