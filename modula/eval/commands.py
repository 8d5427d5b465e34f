"""`modula eval` (one model on every domain) and `modula report` (the comparison across variants)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.errors import ModulaError, UsageError
from modula.eval.evaluate import ROUTINGS, DomainResult
from modula.eval.report import ResultsMissing, domain_line, load_results, render_table, write_report
from modula.eval.run import load_model_dir, run_eval
from modula.infra.layout import EVAL_RESULTS
from modula.infra.storage import Storage

__all__ = ["eval_cmd", "register", "report_cmd"]


def eval_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    variant: Annotated[str, typer.Option("--variant", "-v", help="base | lora | molora | flan | res")] = "base",
    model: Annotated[Path | None, typer.Option("--model", help="A local HF causal-LM folder to evaluate instead.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The row name for --model (default: the folder name).")] = None,
    split: Annotated[str, typer.Option(help="validation or test")] = "test",
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only this domain (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Examples per domain (default: eval.max_examples).")] = None,
    routing: Annotated[str | None, typer.Option(
        help="token | request | pinned (the oracle); default: modula.router.granularity")] = None,
) -> None:
    """Evaluate one model on every configured domain and store its result."""
    cfg = load_config(config, set_)
    if split not in ("validation", "test"):
        raise ModulaError(f"--split: {split!r} is not allowed (allowed: validation, test)")
    if routing is not None and routing not in ROUTINGS:
        raise UsageError(f"--routing: {routing!r} is not allowed (allowed: {', '.join(ROUTINGS)})")
    console = Console()
    storage = Storage(cfg.storage)
    row_name = variant
    mdl = tok = None
    if model is not None:
        mdl, tok = load_model_dir(model, cfg.model.dtype)
        row_name = name or model.name

    def show(r: DomainResult) -> None:
        console.print(domain_line(r))

    with console.status(f"evaluating {row_name}"):
        result, shares = run_eval(cfg, storage, variant=row_name, model=mdl, tokenizer=tok,
                                  split=split, domains=domain or None, limit=limit,
                                  on_domain=show, model_name=str(model) if model else "",
                                  routing=routing)
    row_name = result.variant
    console.print(render_table({row_name: result}, title=f"{row_name} ({split}, {result.seconds:.0f}s)"))
    if shares is not None:
        console.print(f"router gate shares recorded for {len(shares.layers)} routers")


def report_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder (default: eval.output_dir).")] = None,
) -> None:
    """Print the comparison table of every evaluated variant; write JSON, Markdown and PNGs."""
    cfg = load_config(config, set_)
    storage = Storage(cfg.storage)
    results = load_results(storage)
    if not results:
        raise ResultsMissing(
            f"no evaluation results in {storage.uri(EVAL_RESULTS)}: run `modula eval` first")
    console = Console()
    console.print(render_table(results))
    files = write_report(storage, output or Path(cfg.eval.output_dir), results)
    for p in files.values():
        console.print(f"wrote {p}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
