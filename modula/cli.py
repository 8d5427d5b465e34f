"""The ``modula`` command: a table of contents.

Each command lives beside the code it drives, in a ``commands.py`` (``modula.demo`` for the
demo) with ``register(app)``; :data:`COMMANDS` says where. A command's module is imported when
that command runs, so ``modula validate`` does not import torch or Ray.

Errors (docs/architecture.md): a :class:`~modula.errors.ModulaError` is printed as one line,
``error: <message>`` (a bad config as ``invalid config <file>`` and one line per problem), and
the command exits with the error's ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from modula.config.loader import ConfigError
from modula.errors import ModulaError

__all__ = ["COMMANDS", "app", "main", "print_error"]

# command -> the module whose register(app) adds it, in the order `modula --help` lists them
COMMANDS: dict[str, str] = {
    "validate": "modula.config.commands",
    "render": "modula.cluster.commands",
    "cluster": "modula.infra.commands",
    "data": "modula.data.commands",
    "pretrain": "modula.trainers.commands",
    "train": "modula.trainers.commands",
    "tune": "modula.tuning.commands",
    "add-domain": "modula.trainers.commands",
    "eval": "modula.eval.commands",
    "report": "modula.eval.commands",
    "registry": "modula.infra.commands",
    "export": "modula.model.commands",
    "submit": "modula.cluster.commands",
    "serve": "modula.serving.commands",
    "demo": "modula.demo",
}


def print_error(exc: ModulaError) -> None:
    """A user error as the CLI shows it, on stderr."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    if isinstance(exc, ConfigError):
        err.print(Text(f"invalid config{f' {exc.source}' if exc.source else ''}", "bold red"))
        for p in exc.problems:
            err.print(Text(f"  {p}"))
    else:
        err.print(Text.assemble(("error", "bold red"), f": {exc}"))


class _Commands(TyperGroup):
    """Loads a command's module on first use, and turns a ModulaError into its exit code."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, name: str) -> Any:
        if name not in self.commands and name in COMMANDS:
            module = typer.Typer()
            importlib.import_module(COMMANDS[name]).register(module)
            for key, command in typer.main.get_group(module).commands.items():
                self.commands.setdefault(key, command)
        return self.commands.get(name)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModulaError as exc:
            print_error(exc)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Commands,
    name="modula",
    help="Train, tune and serve MoDULA models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Train, tune and serve MoDULA models on Ray."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
