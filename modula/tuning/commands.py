"""`modula tune`: a Ray Tune sweep over one stage, every trial a Ray Train run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from modula.config.loader import DEFAULT_CONFIG_PATH, apply_overrides, load_config, read_raw
from modula.config.options import ConfigOpt, SetOpt
from modula.tuning.sweep import run_sweep

__all__ = ["register", "tune_cmd"]


def _source_raw(config: Path | None, sets: list[str]) -> dict[str, Any] | None:
    """The config file as written (``${ENV}`` kept) with the --set overrides applied."""
    path = config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    raw = read_raw(path) if path else {}
    return apply_overrides(raw, list(sets))


def tune_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str | None, typer.Option(
        "--stage", help="universal | domain:<name> | router | lora | molora "
                        "(default: tune.stage)")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish the sweep of this name after its driver died.")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Delete a sweep of this name and start over.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where the table, plot and best.yaml go "
                               "(default: <eval.output_dir>/tune/<sweep>).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Registry name whose workspace feeds the stage (default: serve.model_name).")] = None,
) -> None:
    """Sweep a stage's hyperparameters on Ray Tune (ASHA on the validation loss); write the
    ranked trials, a plot and the best trial as a config file."""
    import ray

    sets = list(set_ or []) + ([f"tune.stage={stage}"] if stage else [])
    cfg = load_config(config, sets)
    console = Console()
    console.rule(f"[bold]modula tune --stage {cfg.tune.stage}")
    # run_sweep checks the stage's inputs before it connects (a missing expert fails fast) and
    # joins or starts Ray; a Ray this command started is shut down at the end
    started = not ray.is_initialized()
    try:
        result = run_sweep(cfg, storage=None, name=name, resume=resume, fresh=fresh,
                           output_dir=output, console=console,
                           source_raw=_source_raw(config, sets))
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    if result.best is None:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
