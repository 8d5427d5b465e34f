"""The ``modula`` command. Every subcommand takes ``--config`` and ``--set``; a bad config exits 2
with one line per problem and no traceback.

Subpackages add their own commands in a ``commands.py`` with ``register(app)``, listed in
``COMMAND_MODULES``, so this file stays a table of contents.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from modula.config import ModulaConfig
from modula.config.options import ConfigOpt, SetOpt, load_or_exit

app = typer.Typer(
    name="modula",
    help="Train, tune and serve MoDULA models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

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
        rows.append((prefix, yaml.safe_dump(d, default_flow_style=True).strip().removesuffix("...").strip()))
    return rows


@app.command()
def validate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table or yaml")] = "table",
) -> None:
    """Check a config and print it resolved (secrets masked)."""
    cfg = load_or_exit(config, set_)
    data = cfg.to_data(secrets="mask")
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
        return
    if fmt != "table":
        err_console.print(f"--format: {fmt!r} is not allowed (allowed: table, yaml)")
        raise typer.Exit(2)
    table = Table(title=f"modula config: {config or 'embedded default'}", show_lines=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in _flatten(data):
        table.add_row(k, v)
    console.print(table)
    console.print("[green]config is valid[/]")


@app.command()
def render(
    target: Annotated[
        str,
        typer.Option("--target", "-t",
                     help="serve | rayjob | rayservice | raycluster | cluster-launcher"),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here, not stdout.")] = None,
    command: Annotated[
        str, typer.Option(help="For rayjob: the modula command the job runs.")
    ] = "train",
) -> None:
    """Write the deploy file for a real cluster, generated from the config."""
    from modula.cluster.render import TARGETS, RenderError, render_target

    cfg = load_or_exit(config, set_)
    if target not in TARGETS:
        err_console.print(f"--target: {target!r} is not allowed (allowed: {', '.join(TARGETS)})")
        raise typer.Exit(2)
    try:
        text = render_target(cfg, target, command=command,
                             config_path=str(config) if config else "configs/default.yaml")
    except RenderError as exc:
        err_console.print(f"[red]cannot render {target}[/]: {exc}")
        raise typer.Exit(2) from None
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
def cluster(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Connect to the configured Ray cluster and print its resources."""
    from modula.infra.connect import ray_session

    cfg = load_or_exit(config, set_)
    with ray_session(cfg.cluster) as resources:
        _print_resources(cfg, resources)


def _print_resources(cfg: ModulaConfig, resources: dict[str, float]) -> None:
    table = Table(title=f"Ray cluster ({cfg.cluster.address})")
    table.add_column("resource", style="cyan")
    table.add_column("total", justify="right")
    for k in sorted(resources):
        if k.startswith("node:"):
            continue
        v = resources[k]
        table.add_row(k, f"{v / 2**30:.1f} GiB" if "memory" in k else f"{v:g}")
    console.print(table)


# Subcommands that live with the code they drive; each module has register(app).
COMMAND_MODULES = (
    "modula.demo",
    "modula.data.commands",
    "modula.trainers.commands",
    "modula.eval.commands",
    "modula.infra.commands",
    "modula.cluster.commands",
    "modula.serving.commands",
    "modula.tuning.commands",
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
