"""Submitting a ``modula`` command to a Ray cluster as a Ray job (the Jobs API).

``modula submit train --config F`` becomes the job ``python -m modula.cli train --config F`` on
the cluster whose dashboard ``cluster.dashboard_address`` names: the project folder
(``cluster.project_dir``) is the job's working_dir (minus .venv, runs, .git, caches), the
config's ``runtime_env`` is merged in, the job's logs are streamed here until it ends, and the
exit code is the job's (0 when it SUCCEEDED). Ctrl-C stops the job.

The config file travels inside the working dir when it lies there (and is not excluded from the
upload); otherwise its text goes in the job's environment and ``python -m
modula.cluster.submit`` (the job-side launcher, :func:`job_main`) writes it to a temporary file
before running the command. Either way the file is sent as written: ``${VAR}`` references are
resolved on the cluster, from the cluster's environment, so credentials that come from the
environment are never shipped.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import re
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modula.cli import main
from modula.config.schema import ModulaConfig
from modula.errors import ModulaError
from modula.infra.layout import scratch_dir

__all__ = [
    "DEFAULT_EXCLUDES",
    "JobResult",
    "JobSpec",
    "SubmitError",
    "build_job",
    "default_submission_id",
    "exit_code_for",
    "follow_job",
    "job_main",
    "literal_secrets",
    "run_job",
]

# never uploaded with the working dir (gitignore-style patterns, as Ray's `excludes`)
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
    ".mypy_cache", ".ipynb_checkpoints", "*.egg-info", "build", "dist", "benchmarks/results",
]
CONFIG_ENV = "MODULA_JOB_CONFIG_YAML"
SUBMISSION_ENV = "MODULA_SUBMISSION_ID"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_STOPPED = 130  # as a shell reports a command ended by Ctrl-C
EXIT_SUBMIT_ERROR = 3  # the job could not be submitted (or attached to)


class SubmitError(ModulaError):
    """The job could not be submitted: cluster unreachable, id taken, bad project folder."""

    exit_code = EXIT_SUBMIT_ERROR


@dataclass(frozen=True)
class JobSpec:
    """Everything `run_job` sends to the Jobs API."""

    address: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    config_via: str = "default"  # "working_dir" | "env" | "default" (no --config)

    def describe(self) -> str:
        """A one-line summary that never includes the config text or env var values."""
        wd = self.runtime_env.get("working_dir", "-")
        return (f"job {self.submission_id} on {self.address}: {self.entrypoint} "
                f"(working_dir {wd}, config via {self.config_via})")


@dataclass(frozen=True)
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED | FAILED | STOPPED, or PENDING/RUNNING when not waited for
    exit_code: int
    message: str = ""
    driver_exit_code: int | None = None
    logs_streamed: int = 0  # characters of log followed here


def exit_code_for(status: str, driver_exit_code: int | None = None) -> int:
    """The exit code of ``modula submit`` for a job's final status."""
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    if status == "FAILED":
        if driver_exit_code is not None and 0 < driver_exit_code < 256:
            return driver_exit_code
        return 1
    return 0  # PENDING / RUNNING: submitted without waiting


def default_submission_id(command: Sequence[str]) -> str:
    """``modula-<command>-<UTC time>-<random>``: readable in `ray job list`, unique."""
    words: list[str] = []
    for w in command[:2]:
        if w.startswith("-"):
            break
        words.append(w)
    words = words or ["job"]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(words).lower()).strip("-")[:32] or "job"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"modula-{slug}-{stamp}-{uuid.uuid4().hex[:6]}"


# -------------------------------------------------------------------------------- building


def _compose(command: Sequence[str], overrides: Sequence[str], config_arg: str | None) -> list[str]:
    """command + --set ... + --config X, all before a `--` the command may contain."""
    cmd = list(command)
    cut = cmd.index("--") if "--" in cmd else len(cmd)
    extra: list[str] = []
    for o in overrides:
        extra += ["--set", o]
    if config_arg is not None:
        extra += ["--config", config_arg]
    return cmd[:cut] + extra + cmd[cut:]


def _uploaded(project: Path, file: Path, excludes: Sequence[str]) -> bool:
    """Whether Ray's working_dir upload of `project` would include `file` (same rules as Ray:
    `excludes` from the project root, .gitignore/.rayignore of every folder on the way)."""
    try:
        rel = file.resolve().relative_to(project.resolve())
    except ValueError:
        return False
    try:
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:  # pragma: no cover - Ray moved it: ship the config in the env instead
        return False
    use_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    top = PathSpec.from_lines("gitwildmatch", list(excludes))
    parts = rel.parts
    for i in range(1, len(parts) + 1):
        sub = Path(*parts[:i])
        if top.match_file(str(sub)):
            return False
        for j in range(i):  # ignore files of every folder above `sub`
            folder = project / Path(*parts[:j]) if j else project
            for name in (".gitignore", ".rayignore") if use_gitignore else (".rayignore",):
                ign = folder / name
                if ign.is_file():
                    spec = PathSpec.from_lines("gitwildmatch", ign.read_text().splitlines())
                    if spec.match_file(str(Path(*parts[j:i]))):
                        return False
    return True


def build_job(
    cfg: ModulaConfig,
    command: Sequence[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    submission_id: str | None = None,
    address: str | None = None,
    python: str = "python",
) -> JobSpec:
    """The job for ``modula <command>`` under `cfg` (loaded from `config_path` + `overrides`)."""
    if not command:
        raise SubmitError("no command to submit (e.g. `modula submit train --config F`)")
    if command[0] in ("submit",):
        raise SubmitError("`modula submit submit` makes no sense")
    cl = cfg.cluster
    runtime_env: dict[str, Any] = {k: v for k, v in cl.runtime_env.items()}
    env_vars = dict(runtime_env.pop("env_vars", {}) or {})
    excludes = list(DEFAULT_EXCLUDES)
    project: Path | None = None
    if "working_dir" not in runtime_env:
        project = Path(cl.project_dir).expanduser().resolve()
        if not (project / "modula" / "__init__.py").is_file():
            raise SubmitError(
                f"cluster.project_dir {str(project)!r} does not hold the modula package; "
                "run from the project folder, set cluster.project_dir, or give "
                "cluster.runtime_env.working_dir"
            )
        runtime_env["working_dir"] = str(project)
        # a local storage root inside the project is data, not code
        if not cfg.storage.is_s3:
            root = Path(cfg.storage.root).expanduser().resolve()
            try:
                rel = root.relative_to(project).as_posix()
                if rel not in excludes and rel != ".":
                    excludes.append(rel)
            except ValueError:
                pass
        for e in runtime_env.pop("excludes", None) or []:
            if e not in excludes:
                excludes.append(e)
        runtime_env["excludes"] = excludes

    submission_id = submission_id or default_submission_id(command)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", submission_id):
        raise SubmitError(f"--submission-id {submission_id!r}: use letters, digits, '_', '.', '-'")
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    env_vars[SUBMISSION_ENV] = submission_id

    via = "default"
    if config_path is None:
        args = _compose(command, overrides, None)
        module = "modula.cli"
    else:
        cfg_file = Path(config_path).expanduser().resolve()
        if not cfg_file.is_file():
            raise SubmitError(f"config file {str(config_path)!r} does not exist")
        if project is not None and _uploaded(project, cfg_file, excludes):
            via = "working_dir"
            args = _compose(command, overrides, cfg_file.relative_to(project).as_posix())
            module = "modula.cli"
        else:
            via = "env"
            env_vars[CONFIG_ENV] = cfg_file.read_text()
            args = _compose(command, overrides, None)
            module = "modula.cluster.submit"
    if env_vars:
        runtime_env["env_vars"] = env_vars
    entrypoint = shlex.join([python, "-m", module, *args])
    metadata = {"modula_command": shlex.join(list(command)),
                "modula_config": str(config_path) if config_path else "(default)"}
    return JobSpec(address=(address or cl.dashboard_address).rstrip("/"),
                   submission_id=submission_id, entrypoint=entrypoint,
                   runtime_env=runtime_env, metadata=metadata, config_via=via)


def literal_secrets(cfg: ModulaConfig, config_path: str | os.PathLike[str] | None) -> list[str]:
    """Names of the config's secrets written literally in the file (so shipped with the job);
    a ``${VAR}`` reference is resolved on the cluster and not shipped."""
    if config_path is None:
        return []
    try:
        text = Path(config_path).read_text()
    except OSError:
        return []
    found = []
    for name in ("access_key_id", "secret_access_key"):
        secret = getattr(cfg.storage, name)
        if secret is not None and secret.get_secret_value() and secret.get_secret_value() in text:
            found.append(f"storage.{name}")
    return found


# -------------------------------------------------------------------------------- running


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError ...
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


def _info(client: Any, submission_id: str) -> Any | None:
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise


def _status(info: Any) -> str:
    s = info.status
    return str(getattr(s, "value", s))


def _wait_terminal(client: Any, submission_id: str, timeout: float | None = None) -> Any:
    t0 = time.monotonic()
    while True:
        info = client.get_job_info(submission_id)
        if _status(info) in TERMINAL:
            return info
        if timeout is not None and time.monotonic() - t0 > timeout:
            return info
        time.sleep(0.5)


def follow_job(client: Any, submission_id: str, out: Callable[[str], None],
               note: Callable[[str], None] = lambda s: None) -> JobResult:
    """Stream a job's logs to `out` until it ends; its final result.

    KeyboardInterrupt propagates (the caller decides whether to stop the job)."""
    streamed = 0

    async def tail() -> None:
        nonlocal streamed
        async for chunk in client.tail_job_logs(submission_id):
            streamed += len(chunk)
            out(chunk)

    # Our own SIGINT handler while the logs stream: asyncio.run's would only cancel the tail,
    # and a log client that turns the cancellation into an ordinary end of stream would leave
    # us waiting for the job instead of stopping it.
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the log stream broke: keep waiting for the status
        note(f"log stream interrupted ({exc}); waiting for the job to finish")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    info = _wait_terminal(client, submission_id)
    status = _status(info)
    code = getattr(info, "driver_exit_code", None)
    return JobResult(submission_id, status, exit_code_for(status, code),
                     message=(info.message or "").strip(), driver_exit_code=code,
                     logs_streamed=streamed)


def run_job(spec: JobSpec, *, wait: bool = True,
            out: Callable[[str], None] | None = None,
            note: Callable[[str], None] | None = None) -> JobResult:
    """Submit `spec` (or attach to it if a job with its id is still running), follow its logs
    and return its final result. Ctrl-C stops the job (a second Ctrl-C leaves it running)."""
    def _write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    out = out or _write
    note = note or (lambda s: print(s, file=sys.stderr, flush=True))
    client = _client(spec.address)
    existing = _info(client, spec.submission_id)
    if existing is not None:
        status = _status(existing)
        if status in TERMINAL:
            raise SubmitError(
                f"a job with submission id {spec.submission_id!r} already ran ({status}); "
                "give another --submission-id"
            )
        note(f"attaching to the running job {spec.submission_id} ({status})")
    else:
        try:
            client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                              submission_id=spec.submission_id, metadata=spec.metadata)
        except Exception as exc:
            raise SubmitError(f"could not submit {spec.submission_id}: {exc}") from None
        note(f"submitted {spec.describe()}")
    if not wait:
        note(f"not waiting; follow it with: ray job logs --address {spec.address} "
             f"--follow {spec.submission_id}")
        info = _info(client, spec.submission_id)
        return JobResult(spec.submission_id, _status(info) if info else "PENDING", 0)
    note("following its logs (Ctrl-C stops the job)")
    try:
        return follow_job(client, spec.submission_id, out, note)
    except KeyboardInterrupt:
        note(f"stopping job {spec.submission_id} ... (Ctrl-C again to leave it running)")
        try:
            client.stop_job(spec.submission_id)
            info = _wait_terminal(client, spec.submission_id, timeout=60)
        except KeyboardInterrupt:
            note(f"left job {spec.submission_id} running")
            return JobResult(spec.submission_id, "RUNNING", EXIT_STOPPED)
        status = _status(info)
        return JobResult(spec.submission_id, status,
                         EXIT_STOPPED if status not in ("SUCCEEDED", "FAILED")
                         else exit_code_for(status, getattr(info, "driver_exit_code", None)),
                         message=(info.message or "").strip())


# -------------------------------------------------------------------------------- job side


def job_main(argv: Sequence[str] | None = None) -> None:
    """Inside the job: write the config text from $MODULA_JOB_CONFIG_YAML to a file, then run
    ``modula <argv> --config <file>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = os.environ.get(CONFIG_ENV)
    if text is None:
        print(f"modula.cluster.submit: ${CONFIG_ENV} is not set", file=sys.stderr)
        raise SystemExit(2)
    tmpdir = scratch_dir("job")
    cfg_file = tmpdir / "config.yaml"
    cfg_file.write_text(text)
    os.environ.pop(CONFIG_ENV, None)  # not inherited by what the command starts
    sys.argv = ["modula", *_compose(args, (), str(cfg_file))]
    try:
        main()
    finally:
        cfg_file.unlink(missing_ok=True)
        tmpdir.rmdir()


if __name__ == "__main__":
    job_main()
