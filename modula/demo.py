"""`modula demo`: the main job end to end on a config (default: the embedded default).

Validate the config, start Ray, build the data, pretrain (or reuse) the base model, train the
three MoDULA stages, evaluate the base model and the trained variant, write the report. Every
step prints what it does; each is the same code path as its own command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def run_demo(config: Path | None, sets: list[str] | None) -> None:
    from modula.cli import _print_resources, load_or_exit
    from modula.cluster.connect import ray_session
    from modula.data.build import ensure_data
    from modula.eval.report import render_table, write_report
    from modula.eval.run import run_eval
    from modula.infra.storage import Storage
    from modula.trainers.pretrain import run_pretrain
    from modula.trainers.runner import train

    t0 = time.time()
    console.rule("[bold]modula demo")
    cfg = load_or_exit(config, sets)
    console.print(
        f"config valid: variant={cfg.modula.variant}, base={cfg.model.base}, "
        f"experts={cfg.expert_domains()}, storage={cfg.storage.root}"
    )
    storage = Storage(cfg.storage)
    with ray_session(cfg.cluster) as resources:
        _print_resources(cfg, resources)
        console.rule("1. data")
        ensure_data(cfg, storage)
        console.print(f"built-in suite and splits in {storage.uri('data')}")
        if cfg.model.is_builtin:
            console.rule("2. base model (stage 0)")
            res = run_pretrain(cfg, storage, console=console)
            console.print(f"base model: {res.parameters:,} parameters"
                          + (" (reused)" if res.cached else f", trained in {res.train_seconds:.0f}s"))
        console.rule(f"3. MoDULA-{cfg.modula.variant}: universal -> domain experts -> router")
        costs = train(cfg, "all", storage=storage, console=console)
        console.print(f"{len(costs)} runs, {sum(c.worker_seconds for c in costs):.0f} worker-seconds")
        console.rule("4. evaluation")
        results = {}
        for variant in ("base", cfg.modula.variant):
            result, _ = run_eval(cfg, storage, variant=variant)
            results[variant] = result
        console.print(render_table(results))
        files = write_report(storage, Path(cfg.eval.output_dir))
        console.print("report: " + ", ".join(str(p) for p in files.values()))
    console.rule(f"[green]demo finished in {time.time() - t0:.0f}s")


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    ) -> None:
        """Run the main job end to end on the config (default: the embedded default)."""
        run_demo(config, set_)
