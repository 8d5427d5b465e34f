"""`modula pretrain` (the built-in base model, once per config fingerprint), `modula train`
(the MoDULA stages and the baselines) and `modula add-domain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modula.basemodel import check_base_model
from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.errors import UsageError
from modula.infra.connect import ray_session
from modula.infra.storage import Storage
from modula.trainers.plan import STAGE_CHOICES
from modula.trainers.pretrain import PretrainResult, run_pretrain
from modula.trainers.runner import RunCost, add_domain, train

__all__ = ["add_domain_cmd", "cost_table", "pretrain_cmd", "pretrain_table", "register",
           "train_cmd"]

METRICS = ("exact_match", "accuracy", "perplexity")


def pretrain_table(res: PretrainResult, where: str) -> Table:
    """What ``modula pretrain`` built (or found): one row per fact."""
    t = Table(title="built-in base model" + (" (cached)" if res.cached else ""))
    t.add_column("", style="cyan")
    t.add_column("", overflow="fold")
    t.add_row("stored at", where)
    t.add_row("parameters", f"{res.parameters:,}")
    t.add_row("steps / tokens", f"{res.steps} / {res.tokens:,}")
    t.add_row("data + tokenizer", f"{res.data_seconds:.0f}s")
    t.add_row("training", f"{res.train_seconds:.0f}s (total {res.total_seconds:.0f}s)")
    for d in res.perplexity_before:
        t.add_row(f"held-out {d} perplexity",
                  f"{res.perplexity_before[d]:.1f} -> {res.perplexity_after.get(d, float('nan')):.1f}")
    return t


def cost_table(costs: list[RunCost], title: str) -> Table:
    """What each run cost, one row per run, named by what it trains (the run names, with their
    fingerprints, are in the workspace's cost records); ``batch`` is the effective batch of a
    step (rows, over workers and accumulated micro-batches), ``work s`` the worker-seconds.
    Fits 80 columns."""
    t = Table(title=title)
    t.add_column("trains", overflow="fold")
    for col in ("params", "tokens", "steps", "batch", "wall s", "work s", "loss"):
        t.add_column(col, justify="right", no_wrap=True)
    for c in costs:
        steps = f"{c.steps}" + (f"x{c.num_workers}" if c.num_workers > 1 else "")
        t.add_row(", ".join(c.trains), f"{c.trainable_parameters:,}", f"{c.tokens:,}", steps,
                  f"{c.effective_batch}" if c.effective_batch else "-",
                  f"{c.wall_seconds:.0f}", f"{c.worker_seconds:.0f}",
                  f"{c.final_loss:.3f}" if c.final_loss is not None else "-")
    notes = []
    resumed = [f"{', '.join(c.trains)} ({c.resumed}x)" for c in costs if c.resumed]
    if resumed:
        notes.append("resumed from a checkpoint: " + "; ".join(resumed))
    where = _nodes_note(costs)
    if where:
        notes.append(where)
    if notes:
        t.caption = "\n".join(notes)
    return t


def _nodes_note(costs: list[RunCost]) -> str:
    """Where the runs' workers ran, when they used more than one node in all: each node by its
    IP address, or by its id where several nodes share an address (nodes on one machine)."""
    ids = {n["node_id"] for c in costs for n in c.nodes}
    if len(ids) < 2:
        return ""
    by_ip = len({n["ip"] for c in costs for n in c.nodes}) == len(ids)

    def label(n: dict) -> str:
        return n["ip"] if by_ip else f"node {n['node_id'][:6]}"

    parts = []
    for c in costs:
        if c.nodes:
            seen = ", ".join(dict.fromkeys(label(n) for n in c.nodes))
            moved = f" ({len(c.node_history)} attempts)" if len(c.node_history) > 1 else ""
            parts.append(f"{', '.join(c.trains)} on {seen}{moved}")
    return "nodes: " + "; ".join(parts)


def pretrain_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if this model is stored.")] = False,
) -> None:
    """Pretrain the built-in base model with Ray Train (stage 0) and store it."""
    cfg = load_config(config, set_)
    console = Console()
    if not cfg.model.is_builtin:
        console.print(f"model.base is {cfg.model.base!r}: nothing to pretrain "
                      "(only the built-in model, builtin:tiny, is built here)")
        return
    storage = Storage(cfg.storage)
    console.rule("[bold]modula pretrain")
    with ray_session(cfg.cluster):
        res = run_pretrain(cfg, storage, force=force, console=console)
    console.print(pretrain_table(res, storage.uri(res.key)))


def train_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str, typer.Option(
        "--stage", help="all | universal | domains | router | lora | molora")] = "all",
    name: Annotated[str | None, typer.Option(help="Registry name (default: serve.model_name).")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the registry when complete.")] = True,
) -> None:
    """Train a stage (or all three in order) on Ray Train and publish the complete model."""
    cfg = load_config(config, set_)
    if stage not in STAGE_CHOICES:
        raise UsageError(f"--stage: {stage!r} is not allowed (allowed: {', '.join(STAGE_CHOICES)})")
    check_base_model(cfg)  # a base the engine cannot serve stops here, before Ray starts
    console = Console()
    console.rule(f"[bold]modula train --stage {stage}")
    with ray_session(cfg.cluster):
        costs = train(cfg, stage, name=name, console=console, publish_result=publish)
    console.print(cost_table(costs, f"cost of `train --stage {stage}`"))


def add_domain_cmd(
    domain: Annotated[str, typer.Argument(help="The new domain's name.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[str | None, typer.Option(
        help="Parquet / JSONL files (local or s3://) with prompt and response columns; "
             "not needed for a built-in domain.")] = None,
    metric: Annotated[str, typer.Option(help="exact_match | accuracy | perplexity")] = "exact_match",
    name: Annotated[str | None, typer.Option(help="Registry name (default: serve.model_name).")] = None,
    from_peft: Annotated[Path | None, typer.Option(
        "--from-peft", help="Import the expert from a PEFT LoRA adapter directory "
                            "(adapter_config.json + adapter_model.safetensors; variant flan) "
                            "instead of training it; then only the routing trains.")] = None,
    any_base: Annotated[bool, typer.Option(
        "--any-base", help="With --from-peft: accept an adapter whose base model name differs "
                           "(the layer shapes are still checked).")] = False,
) -> None:
    """Plug a new domain into the published model: its expert (trained, or imported with
    --from-peft), then the routers; nothing else."""
    cfg = load_config(config, set_)
    if metric not in METRICS:
        raise UsageError(f"--metric: {metric!r} is not allowed (allowed: {', '.join(METRICS)})")
    if any_base and from_peft is None:
        raise UsageError("--any-base goes with --from-peft")
    check_base_model(cfg)
    console = Console()
    console.rule(f"[bold]modula add-domain {domain}")
    with ray_session(cfg.cluster):
        version, costs = add_domain(cfg, domain, data=data, name=name, console=console,
                                    metric=metric, from_peft=from_peft, any_base=any_base)
    console.print(cost_table(costs, f"cost of adding {domain!r} (v{version.version})"))


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)
    app.command("train")(train_cmd)
    app.command("add-domain")(add_domain_cmd)
