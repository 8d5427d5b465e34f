"""The `modula` command as a user runs it: exit codes, messages, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from modula.cli import app

runner = CliRunner()


def run_modula(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modula.cli", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_validate_prints_the_resolved_config(repo_root):
    res = runner.invoke(app, ["validate", "-c", str(repo_root / "configs/default.yaml"),
                              "--set", "modula.variant=flan"])
    assert res.exit_code == 0, res.output
    assert "config is valid" in res.output
    assert "modula.variant" in res.output and "flan" in res.output
    res = runner.invoke(app, ["validate", "--format", "yaml", "--set", "serve.port=9001"])
    assert res.exit_code == 0
    data = yaml.safe_load(res.output)
    assert data["serve"]["port"] == 9001 and data["modula"]["variant"] == "res"


def test_bad_config_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "modula: {variant: moe, universal_rank: 0}\n"
        "serve: {autoscaling: {min_replicas: 3, max_replicas: 1}}\n"
        "storage: {root: 's3://'}\n"
    )
    res = run_modula("validate", "--config", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("invalid config")
    problems = lines[1:]
    assert len(problems) == 4, problems
    assert {p.split(":")[0] for p in problems} == {
        "modula.variant", "modula.universal_rank", "serve.autoscaling", "storage.root"}


def test_secret_is_masked_in_validate_output(monkeypatch):
    monkeypatch.setenv("MODULA_TEST_SECRET", "sk-never-print-me")
    res = runner.invoke(app, ["validate", "--set", "serve.api_keys=[\"${MODULA_TEST_SECRET}\"]",
                              "--format", "yaml"])
    assert res.exit_code == 0, res.output
    assert "sk-never-print-me" not in res.output
    assert "**********" in res.output


def test_unknown_command_and_bad_option_do_not_crash():
    res = run_modula("frobnicate")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = run_modula("validate", "--format", "xml")
    assert res.returncode == 2 and "allowed: table, yaml" in res.stderr


@pytest.mark.integration
def test_cluster_command_starts_local_ray_and_prints_resources():
    res = run_modula("cluster", "--set", "cluster.num_cpus=3", "--set", "cluster.dashboard=false",
                     env={"RAY_AUTH_MODE": "disabled"}, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CPU" in res.stdout
    row = next(ln for ln in res.stdout.splitlines() if " CPU " in ln)
    assert row.split()[-2] == "3", row


def test_a_taken_dashboard_port_moves_to_a_free_one():
    """Two local Rays on one machine (a demo next to a test session): the second one's
    dashboard must not collide with the first's 8265, or ray.init refuses to start."""
    import socket

    from modula.infra.connect import dashboard_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        other = dashboard_port(taken)
        assert other != taken and 1024 <= other <= 65535
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", other))  # really free
    assert dashboard_port(taken) == taken  # free again once released
