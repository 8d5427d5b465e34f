"""`modula cluster` (connect to the configured Ray and print its resources) and `modula registry
list|show|pull` (what the expert registry under ``storage.root`` holds; a checked copy of one
version)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.config.schema import ModulaConfig
from modula.infra.connect import ray_session
from modula.infra.layout import expert_file
from modula.infra.registry import ModelVersion, Registry

__all__ = [
    "cluster",
    "experts_table",
    "list_cmd",
    "models_table",
    "print_resources",
    "pull_cmd",
    "pulled_table",
    "register",
    "resources_table",
    "show_cmd",
]


def _console() -> Console:
    return Console()  # made per call: picks up the terminal width of the moment


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# ----------------------------------------------------------------------------------- cluster


def resources_table(cfg: ModulaConfig, resources: dict[str, float]) -> Table:
    """A Ray cluster's logical resources (memory in GiB), as ``modula cluster`` prints them."""
    table = Table(title=f"Ray cluster ({cfg.cluster.address})")
    table.add_column("resource", style="cyan", overflow="fold")
    table.add_column("total", justify="right")
    for k in sorted(resources):
        if k.startswith("node:"):
            continue
        v = resources[k]
        table.add_row(k, f"{v / 2**30:.1f} GiB" if "memory" in k else f"{v:g}")
    return table


def print_resources(cfg: ModulaConfig, resources: dict[str, float]) -> None:
    _console().print(resources_table(cfg, resources))


def cluster(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Connect to the configured Ray cluster and print its resources."""
    cfg = load_config(config, set_)
    with ray_session(cfg.cluster) as resources:
        print_resources(cfg, resources)


# ----------------------------------------------------------------------------------- registry


def models_table(where: str, latest: list[tuple[ModelVersion, int]]) -> Table:
    """Each model's latest version (of how many), as ``registry list``; when it was published
    is in ``registry show``."""
    table = Table(title=f"registry: {where}")
    table.add_column("model", overflow="fold")
    table.add_column("latest", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    table.add_column("base model", overflow="fold")
    table.add_column("experts")
    table.add_column("size", no_wrap=True)
    for mv, versions in latest:
        table.add_row(mv.model, f"{mv.version} of {versions}", mv.variant or "-",
                      mv.base_model.id if mv.base_model else "-",
                      ", ".join(mv.experts) or "-", _size(mv.size))
    return table


def experts_table(mv: ModelVersion) -> Table:
    """The experts of one version: size, content hash, the version each dates from; their
    files when they are not named the usual way (``<expert>.safetensors``)."""
    files = any(e.file not in (expert_file(e.name), f"{e.name}.safetensors")
                for e in mv.experts.values())
    table = Table(title="experts")
    cols = ["expert", "kind", *(["file"] if files else []), "since", "size", "sha256", "metrics"]
    for col in cols:
        table.add_column(col, overflow="fold", no_wrap=col in ("since", "size", "sha256"))
    for e in mv.experts.values():
        table.add_row(e.name, e.kind, *([e.file] if files else []), f"v{e.version}",
                      _size(e.size), e.sha256[:12], _metrics(e.metrics) or "-")
    return table


def list_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the models in the registry with their latest version."""
    reg = Registry.from_config(load_config(config, set_))
    where = reg.storage.uri(reg.prefix)
    models = reg.list_models()
    if not models:
        _console().print(f"no models in {where}")
        return
    latest = [(reg.show(m), len(reg.list_versions(m))) for m in models]
    _console().print(models_table(where, latest))


def show_cmd(
    model: Annotated[str, typer.Argument(help="The model name.")],
    version: Annotated[int | None, typer.Option("--version", "-v", help="Default: latest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show one version of a model: base model, variant, every expert and file."""
    reg = Registry.from_config(load_config(config, set_))
    mv = reg.show(model, version)
    latest = reg.latest_version(model)
    if as_json:
        sys.stdout.write(json.dumps(mv.to_dict(), indent=2) + "\n")
        return
    console = _console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="cyan")
    head.add_column(overflow="fold")
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
    console.print(experts_table(mv))
    others = [f for p, f in mv.files.items() if p not in {e.file for e in mv.experts.values()}]
    if others:
        files = Table(title="other files")
        files.add_column("file", overflow="fold")
        files.add_column("size", no_wrap=True)
        files.add_column("sha256", no_wrap=True)
        for f in others:
            files.add_row(f.path, _size(f.size), f.sha256[:12])
        console.print(files)


def pulled_table(mv: ModelVersion, where: str, downloaded: list[str]) -> Table:
    """The files of a pulled version: each one's size and sha256, and whether it was fetched
    now or already there (same sha256)."""
    table = Table(title=f"{mv.model} v{mv.version} -> {where}")
    table.add_column("file", overflow="fold")
    table.add_column("size", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    table.add_column("", no_wrap=True)
    for f in mv.files.values():
        table.add_row(f.path, _size(f.size), f.sha256[:12],
                      "fetched" if f.path in downloaded else "kept")
    table.caption = "every file's sha256 verified"
    return table


def pull_cmd(
    model: Annotated[str, typer.Argument(help="The model name.")],
    dest: Annotated[Path, typer.Argument(help="An empty or new folder (or one an earlier pull "
                                              "of this model wrote).")],
    version: Annotated[int | None, typer.Option("--version", "-v", help="Default: latest.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Copy one published version into a folder: every file, its sha256 checked, and the
    manifest (`.modula-registry.json`)."""
    reg = Registry.from_config(load_config(config, set_))
    local = reg.fetch(model, version, dest)
    _console().print(pulled_table(local.manifest, str(dest), local.downloaded))


def register(app: typer.Typer) -> None:
    app.command("cluster")(cluster)
    registry_app = typer.Typer(help="The expert registry under storage.root.",
                               no_args_is_help=True)
    registry_app.command("list")(list_cmd)
    registry_app.command("show")(show_cmd)
    registry_app.command("pull")(pull_cmd)
    app.add_typer(registry_app, name="registry")
