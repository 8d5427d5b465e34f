"""`modula pretrain` (the built-in base model, once per config fingerprint), `modula train`
(the MoDULA stages and the baselines) and `modula add-domain`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modula.config.options import ConfigOpt, SetOpt


def pretrain_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if this model is stored.")] = False,
) -> None:
    """Pretrain the built-in base model with Ray Train (stage 0) and store it."""
    from modula.cli import load_or_exit
    from modula.infra.connect import ray_session
    from modula.infra.storage import Storage
    from modula.trainers.pretrain import run_pretrain

    cfg = load_or_exit(config, set_)
    console = Console()
    if not cfg.model.is_builtin:
        console.print(f"model.base is {cfg.model.base!r}: nothing to pretrain "
                      "(only the built-in model, builtin:tiny, is built here)")
        return
    storage = Storage(cfg.storage)
    console.rule("[bold]modula pretrain")
    with ray_session(cfg.cluster):
        try:
            res = run_pretrain(cfg, storage, force=force, console=console)
        except (RuntimeError, FileNotFoundError) as exc:
            Console(stderr=True).print(f"[bold red]pretraining failed[/]: {exc}", highlight=False)
            raise typer.Exit(1) from None
    t = Table(title="built-in base model" + (" (cached)" if res.cached else ""))
    t.add_column("", style="cyan")
    t.add_column("")
    t.add_row("stored at", storage.uri(res.key))
    t.add_row("parameters", f"{res.parameters:,}")
    t.add_row("steps / tokens", f"{res.steps} / {res.tokens:,}")
    t.add_row("data + tokenizer", f"{res.data_seconds:.0f}s")
    t.add_row("training", f"{res.train_seconds:.0f}s (total {res.total_seconds:.0f}s)")
    for d in res.perplexity_before:
        t.add_row(f"held-out {d} perplexity", f"{res.perplexity_before[d]:.1f} -> {res.perplexity_after.get(d, float('nan')):.1f}")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)
    app.command("train")(train_cmd)
    app.command("add-domain")(add_domain_cmd)


def _cost_table(costs: list, title: str) -> Table:
    t = Table(title=title)
    for col in ("run", "trains", "trainable params", "tokens", "steps", "workers",
                "wall s", "worker-s", "final loss", "resumed"):
        t.add_column(col, justify="left" if col in ("run", "trains") else "right")
    for c in costs:
        t.add_row(c.run, ", ".join(c.trains), f"{c.trainable_parameters:,}", f"{c.tokens:,}",
                  str(c.steps), str(c.num_workers), f"{c.wall_seconds:.0f}",
                  f"{c.worker_seconds:.0f}",
                  f"{c.final_loss:.3f}" if c.final_loss is not None else "-", str(c.resumed))
    return t


def train_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str, typer.Option(
        "--stage", help="all | universal | domains | router | lora | molora")] = "all",
    name: Annotated[str | None, typer.Option(help="Registry name (default: serve.model_name).")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the registry when complete.")] = True,
) -> None:
    """Train a stage (or all three in order) on Ray Train and publish the complete model."""
    from modula.basemodel import BaseModelMissing
    from modula.cli import load_or_exit
    from modula.infra.connect import ray_session
    from modula.trainers.plan import STAGE_CHOICES
    from modula.trainers.runner import StageError, train

    cfg = load_or_exit(config, set_)
    err = Console(stderr=True, soft_wrap=True)
    if stage not in STAGE_CHOICES:
        err.print(f"--stage: {stage!r} is not allowed (allowed: {', '.join(STAGE_CHOICES)})")
        raise typer.Exit(2)
    console = Console()
    console.rule(f"[bold]modula train --stage {stage}")
    with ray_session(cfg.cluster):
        try:
            costs = train(cfg, stage, name=name, console=console, publish_result=publish)
        except (StageError, ValueError, FileNotFoundError, BaseModelMissing) as exc:
            err.print(f"[bold red]training failed[/]: {exc}", highlight=False, markup=False)
            raise typer.Exit(1) from None
    console.print(_cost_table(costs, f"cost of `train --stage {stage}`"))


def add_domain_cmd(
    domain: Annotated[str, typer.Argument(help="The new domain's name.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[str | None, typer.Option(
        help="Parquet / JSONL files (local or s3://) with prompt and response columns; "
             "not needed for a built-in domain.")] = None,
    metric: Annotated[str, typer.Option(help="exact_match | accuracy | perplexity")] = "exact_match",
    name: Annotated[str | None, typer.Option(help="Registry name (default: serve.model_name).")] = None,
) -> None:
    """Plug a new domain into the published model: its expert, then the routers; nothing else."""
    from modula.cli import load_or_exit
    from modula.infra.connect import ray_session
    from modula.infra.registry import RegistryError
    from modula.trainers.runner import StageError, add_domain

    cfg = load_or_exit(config, set_)
    err = Console(stderr=True, soft_wrap=True)
    if metric not in ("exact_match", "accuracy", "perplexity"):
        err.print(f"--metric: {metric!r} is not allowed (allowed: exact_match, accuracy, perplexity)")
        raise typer.Exit(2)
    console = Console()
    console.rule(f"[bold]modula add-domain {domain}")
    with ray_session(cfg.cluster):
        try:
            version, costs = add_domain(cfg, domain, data=data, name=name, console=console,
                                        metric=metric)
        except (StageError, ValueError, FileNotFoundError, RegistryError) as exc:
            err.print(f"[bold red]add-domain failed[/]: {exc}", highlight=False, markup=False)
            raise typer.Exit(1) from None
    console.print(_cost_table(costs, f"cost of adding {domain!r} (v{version.version})"))
