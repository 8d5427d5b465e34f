"""`modula registry list|show`: what the expert registry under ``storage.root`` holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modula.config.options import ConfigOpt, SetOpt


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)  # made per call: picks up the terminal width of the moment



def _registry(config: Path | None, sets: list[str] | None):
    from modula.cli import load_or_exit
    from modula.infra.registry import Registry

    cfg = load_or_exit(config, sets)
    return cfg, Registry.from_config(cfg)


def _fail(msg: str) -> typer.Exit:
    _console(stderr=True).print(f"[bold red]error[/]: {msg}", highlight=False)
    return typer.Exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def list_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the models in the registry with their latest version."""
    from modula.infra.registry import RegistryError
    from modula.infra.storage import StorageError

    cfg, reg = _registry(config, set_)
    console = _console()
    try:
        models = reg.list_models()
        table = Table(title=f"registry: {reg.storage.uri(reg.prefix)}")
        for col in ("model", "latest", "versions", "variant", "base model", "experts",
                    "size", "published"):
            table.add_column(col, overflow="fold", no_wrap=col in ("model", "latest"))
        for m in models:
            mv = reg.show(m)
            table.add_row(
                m, str(mv.version), str(len(reg.list_versions(m))), mv.variant or "-",
                mv.base_model.id if mv.base_model else "-",
                ", ".join(mv.experts) or "-", _size(mv.size), mv.created_at,
            )
    except (RegistryError, StorageError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    if not models:
        console.print(f"no models in {reg.storage.uri(reg.prefix)}")
        return
    console.print(table)


def show_cmd(
    model: Annotated[str, typer.Argument(help="The model name.")],
    version: Annotated[int | None, typer.Option("--version", "-v", help="Default: latest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show one version of a model: base model, variant, every expert and file."""
    from modula.infra.registry import RegistryError
    from modula.infra.storage import StorageError

    cfg, reg = _registry(config, set_)
    try:
        mv = reg.show(model, version)
        latest = reg.latest_version(model)
    except (RegistryError, StorageError) as exc:
        raise _fail(str(exc)) from None
    console = _console()
    if as_json:
        sys.stdout.write(json.dumps(mv.to_dict(), indent=2) + "\n")
        return
    head = Table.grid(padding=(0, 2))
    head.add_column(style="cyan")
    head.add_column()
    head.add_row("model", mv.model)
    head.add_row("version", f"{mv.version}" + (" (latest)" if mv.version == latest else
                                                f" (latest: {latest})"))
    head.add_row("parent", str(mv.parent) if mv.parent is not None else "-")
    head.add_row("published", f"{mv.created_at} by {mv.publisher}")
    head.add_row("base model", f"{mv.base_model.id} sha256={mv.base_model.sha256 or '-'}"
                 if mv.base_model else "-")
    head.add_row("variant", mv.variant or "-")
    for k, v in mv.metadata.items():
        head.add_row(k, json.dumps(v) if not isinstance(v, str) else v)
    console.print(head)

    experts = Table(title="experts")
    for col in ("expert", "kind", "file", "size", "sha256", "since", "metrics"):
        experts.add_column(col, overflow="fold")
    for e in mv.experts.values():
        experts.add_row(e.name, e.kind, e.file, _size(e.size), e.sha256[:12], f"v{e.version}",
                        _metrics(e.metrics) or "-")
    console.print(experts)
    others = [f for p, f in mv.files.items() if p not in {e.file for e in mv.experts.values()}]
    if others:
        files = Table(title="other files")
        for col in ("file", "size", "sha256"):
            files.add_column(col)
        for f in others:
            files.add_row(f.path, _size(f.size), f.sha256[:12])
        console.print(files)


def register(app: typer.Typer) -> None:
    registry_app = typer.Typer(help="The expert registry under storage.root.",
                               no_args_is_help=True)
    registry_app.command("list")(list_cmd)
    registry_app.command("show")(show_cmd)
    app.add_typer(registry_app, name="registry")
