"""`modula render` (deploy files from the config) and `modula submit` (any modula command as a
Ray job on the configured cluster)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modula.cluster.render import TARGETS, render_target
from modula.cluster.submit import build_job, literal_secrets, run_job
from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.errors import UsageError

__all__ = ["register", "render", "submit"]


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
    cfg = load_config(config, set_)
    if target not in TARGETS:
        raise UsageError(f"--target: {target!r} is not allowed (allowed: {', '.join(TARGETS)})")
    text = render_target(cfg, target, command=command,
                         config_path=str(config) if config else "configs/default.yaml")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        Console().print(f"wrote {output}")
    else:
        sys.stdout.write(text)


def _quiet_ray_client_logs() -> None:
    """Ray's job client logs every packaging step at INFO; keep the terminal for the job."""
    import ray.job_submission  # noqa: F401 - its loggers set their level on import

    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "'.git' is now ignored by default": we exclude it (and .venv) on purpose
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def submit(
    command: Annotated[
        list[str] | None,
        typer.Argument(help="The modula command and its arguments, e.g. `train --stage "
                            "universal` (put them after `--` to keep --set/--config for "
                            "the job only)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="The config YAML, used here and by the job."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field, here and in the job (repeatable)."),
    ] = None,
    submission_id: Annotated[
        str | None,
        typer.Option("--submission-id",
                     help="The job's id (default: modula-<command>-<time>-<random>); "
                          "the id of a running job attaches to it."),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Submit and return without following.")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option("--address",
                     help="The Jobs API (http://HEAD:8265); default: from cluster.address."),
    ] = None,
) -> None:
    """Submit a modula command as a Ray job, stream its logs, exit with its status."""
    err_console = Console(stderr=True)
    cfg = load_config(config, set_)
    _quiet_ray_client_logs()
    for name in literal_secrets(cfg, config):
        err_console.print(f"[yellow]warning[/]: {name} is written in {config} and is "
                          "shipped with the job; prefer ${{ENV_VAR}} references",
                          highlight=False)
    spec = build_job(cfg, command or [], config_path=config, overrides=set_ or [],
                     submission_id=submission_id, address=address)
    result = run_job(spec, wait=not no_wait,
                     note=lambda s: err_console.print(s, highlight=False, markup=False,
                                                         soft_wrap=True))
    if no_wait:
        err_console.print(f"job {result.submission_id}: {result.status}", highlight=False)
        return
    color = "green" if result.status == "SUCCEEDED" else "red"
    err_console.print(
        f"[{color}]job {result.submission_id} {result.status}[/]"
        + (f" (exit code {result.driver_exit_code})" if result.driver_exit_code else ""),
        highlight=False,
    )
    if result.status == "FAILED" and result.driver_exit_code is None and result.message:
        err_console.print(result.message.splitlines()[0], markup=False, highlight=False)
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command("render")(render)
    app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        no_args_is_help=True,
    )(submit)
