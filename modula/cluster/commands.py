"""`modula submit <command...>`: run a modula command as a Ray job on the configured cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True)


def _quiet_ray_client_logs() -> None:
    """Ray's job client logs every packaging step at INFO; keep the terminal for the job."""
    import logging

    import ray.job_submission  # noqa: F401 - its loggers set their level on import

    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "'.git' is now ignored by default": we exclude it (and .venv) on purpose
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def register(app: typer.Typer) -> None:
    @app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        no_args_is_help=True,
    )
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
        from modula.cli import load_or_exit
        from modula.cluster.submit import (
            EXIT_SUBMIT_ERROR,
            SubmitError,
            build_job,
            literal_secrets,
            run_job,
        )

        cfg = load_or_exit(config, set_)
        _quiet_ray_client_logs()
        for name in literal_secrets(cfg, config):
            err_console.print(f"[yellow]warning[/]: {name} is written in {config} and is "
                              "shipped with the job; prefer ${{ENV_VAR}} references",
                              highlight=False)
        try:
            spec = build_job(cfg, command or [], config_path=config, overrides=set_ or [],
                             submission_id=submission_id, address=address)
            result = run_job(spec, wait=not no_wait,
                             note=lambda s: err_console.print(s, highlight=False, markup=False,
                                                                 soft_wrap=True))
        except SubmitError as exc:
            err_console.print(f"[bold red]submit failed[/]: {exc}", highlight=False)
            raise typer.Exit(EXIT_SUBMIT_ERROR) from None
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
