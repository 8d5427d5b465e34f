"""`modula submit`: the job it builds (unit), and real submissions to a local Ray cluster that
this module starts with `ray start --head --block` in its own temp dir and stops by killing
exactly the processes it started (`ray stop` would kill every Ray on the machine)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, free_port

from modula.cluster.submit import (
    CONFIG_ENV,
    EXIT_STOPPED,
    JobSpec,
    SubmitError,
    build_job,
    default_submission_id,
    exit_code_for,
    job_main,
    literal_secrets,
    run_job,
)
from modula.config import config_from_dict, load_config

VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------- unit


def test_job_for_a_config_inside_the_project(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config(REPO_ROOT / "configs/default.yaml", ["serve.port=9001"])
    spec = build_job(cfg, ["validate", "--format", "yaml"], config_path="configs/default.yaml",
                     overrides=["serve.port=9001"], submission_id="my-job")
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "modula.cli", "validate", "--format", "yaml",
        "--set", "serve.port=9001", "--config", "configs/default.yaml"]
    assert spec.config_via == "working_dir" and spec.submission_id == "my-job"
    env = spec.runtime_env
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".venv", ".git", "runs", "**/__pycache__"} <= set(env["excludes"])
    assert env["env_vars"]["MODULA_SUBMISSION_ID"] == "my-job"
    assert spec.address == "http://127.0.0.1:8265"  # cluster.address: local


def test_job_for_a_config_outside_the_project_ships_its_text(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    raw = {"cluster": {"address": "ray://head.example:10001", "runtime_env": {
        "env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": ["data/"], "pip": ["x==1"]}},
        "storage": {"root": str(REPO_ROOT / "artifacts")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    spec = build_job(cfg, ["registry", "list", "--", "extra"], config_path=path)
    assert spec.config_via == "env"
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "modula.cluster.submit", "registry", "list", "--", "extra"]
    env = spec.runtime_env
    assert env["env_vars"][CONFIG_ENV] == path.read_text()
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["pip"] == ["x==1"]
    assert "data/" in env["excludes"] and "artifacts" in env["excludes"]  # local storage root
    assert spec.address == "http://head.example:8265"
    assert CONFIG_ENV not in spec.describe() and path.read_text() not in spec.describe()
    assert spec.submission_id.startswith("modula-registry-list-")
    # an excluded folder inside the project (runs/) is not uploaded: shipped by env too
    runs_cfg = REPO_ROOT / "runs" / "test-submit-cfg.yaml"
    runs_cfg.parent.mkdir(exist_ok=True)
    runs_cfg.write_text("{}\n")
    try:
        assert build_job(cfg, ["validate"], config_path=runs_cfg).config_via == "env"
    finally:
        runs_cfg.unlink()


def test_job_building_refuses_clearly(tmp_path, monkeypatch):
    cfg = config_from_dict({"cluster": {"project_dir": str(tmp_path)}})
    with pytest.raises(SubmitError, match="does not hold the modula package"):
        build_job(cfg, ["validate"])
    cfg = config_from_dict({"cluster": {"runtime_env": {"working_dir": "s3://b/pkg.zip"}}})
    spec = build_job(cfg, ["validate"])  # a given working_dir is used as is
    assert spec.runtime_env["working_dir"] == "s3://b/pkg.zip" and "excludes" not in spec.runtime_env
    with pytest.raises(SubmitError, match="no command"):
        build_job(cfg, [])
    with pytest.raises(SubmitError, match="submission-id"):
        build_job(cfg, ["validate"], submission_id="bad id!")
    with pytest.raises(SubmitError, match="does not exist"):
        build_job(cfg, ["validate"], config_path=tmp_path / "missing.yaml")


def test_exit_codes_and_ids():
    assert exit_code_for("SUCCEEDED", 0) == 0
    assert exit_code_for("FAILED", 2) == 2 and exit_code_for("FAILED", None) == 1
    assert exit_code_for("FAILED", -9) == 1 and exit_code_for("STOPPED") == EXIT_STOPPED
    a, b = default_submission_id(["train", "--stage", "x"]), default_submission_id(["train"])
    assert a.startswith("modula-train-") and a != b


def test_literal_secrets_are_noticed(tmp_path, monkeypatch):
    lit = tmp_path / "lit.yaml"
    lit.write_text("storage: {root: s3://bkt/p, access_key_id: AKIAXX, secret_access_key: s3cr3t}\n")
    assert literal_secrets(load_config(lit), lit) == ["storage.access_key_id",
                                                      "storage.secret_access_key"]
    ref = tmp_path / "ref.yaml"
    ref.write_text("storage: {root: s3://bkt/p, access_key_id: '${K}', secret_access_key: '${S}'}\n")
    monkeypatch.setenv("K", "AKIAXX")
    monkeypatch.setenv("S", "s3cr3t")
    assert literal_secrets(load_config(ref), ref) == []


def test_job_side_launcher_runs_the_command_on_the_shipped_config(monkeypatch, capsys):
    monkeypatch.setenv(CONFIG_ENV, "serve: {port: 9555}\n")
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        job_main(["validate", "--format", "yaml"])
    assert exc.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["serve"]["port"] == 9555
    monkeypatch.setenv(CONFIG_ENV, "modula: {variant: nope}\n")  # invalid
    with pytest.raises(SystemExit) as exc:
        job_main(["validate"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------- cluster


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _with_marker(marker: str) -> set[int]:
    found = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(d))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node with the dashboard (Jobs API) on free ports; yields the Jobs API address."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="mdl-ray-", dir="/tmp")  # short: unix socket paths
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash,
             "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # the jobs' `python` is this venv's
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start failed:\n"
                                       + (Path(temp_dir) / "ray-start.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield address
    finally:
        ours = _descendants(proc.pid) | _with_marker(temp_dir)
        proc.send_signal(signal.SIGINT)  # --block: shuts its processes down on exit
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ours |= _with_marker(temp_dir)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in ours:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _modula(*args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "modula.cli", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SLEEPER = (f"{shlex.quote(sys.executable)} -c \"import time; print('tick', flush=True); "
           "time.sleep(1800)\"")


@pytest.mark.integration
def test_submit_to_a_real_cluster(ray_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster)
    bad = tmp_path / "outside.yaml"
    bad.write_text("serve: {port: 9124}\n")
    # three jobs at once: a succeeding one (config in the working dir), a failing one (config
    # shipped in the env, a bad --set only the job sees), and one we stop with Ctrl-C
    ok = _modula("submit", "validate", "--format", "yaml", "--config", "configs/default.yaml",
                 "--set", "serve.port=9123", "--address", ray_cluster,
                 "--submission-id", f"ok-{tmp_path.name}")
    fail = _modula("submit", "--config", str(bad), "--address", ray_cluster, "--",
                   "validate", "--set", "stages.router.lr=5")
    stopper = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from modula.cluster.submit import JobSpec, run_job\n"
            f"r = run_job(JobSpec({ray_cluster!r}, 'sleeper-{tmp_path.name}', {SLEEPER!r}, {{}}))\n"
            "sys.exit(r.exit_code)")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # a bad --set for both sides fails here, before anything is submitted
    local_bad = _modula("submit", "validate", "--set", "stages.router.lr=5",
                        "--address", ray_cluster)
    out, err = local_bad.communicate(timeout=180)
    assert local_bad.returncode == 2 and "stages.router.lr" in err and "submitted" not in err

    # Ctrl-C once the sleeper's log has arrived: the job is stopped
    seen = []
    while not seen or seen[-1].strip() != "tick":
        seen.append(stopper.stdout.readline())
        assert seen[-1], ("".join(seen), stopper.stderr.read())  # EOF before the job's tick
    stopper.send_signal(signal.SIGINT)
    s_out, s_err = stopper.communicate(timeout=180)
    assert stopper.returncode == EXIT_STOPPED, s_err
    assert "stopping job" in s_err
    assert str(client.get_job_status(f"sleeper-{tmp_path.name}")) in ("STOPPED",
                                                                       "JobStatus.STOPPED")

    out, err = ok.communicate(timeout=240)
    assert ok.returncode == 0, err
    assert "port: 9123" in out  # the job's own output, streamed here
    assert "SUCCEEDED" in err and "config via working_dir" in err
    info = client.get_job_info(f"ok-{tmp_path.name}")
    assert info.runtime_env["env_vars"]["MODULA_SUBMISSION_ID"] == f"ok-{tmp_path.name}"

    out, err = fail.communicate(timeout=240)
    assert fail.returncode == 2, (out, err)  # the job's exit code: invalid config
    assert "stages.router.lr" in out and "invalid config" in out  # streamed from the job
    assert "FAILED" in err and "config via env" in err

    # the id of a finished job cannot be reused; a running one is attached to
    again = _modula("submit", "validate", "--address", ray_cluster,
                    "--submission-id", f"ok-{tmp_path.name}")
    out, err = again.communicate(timeout=180)
    assert again.returncode == 3 and "already ran (SUCCEEDED)" in err


@pytest.mark.integration
def test_no_wait_then_attach(ray_cluster, tmp_path):
    entry = f"{shlex.quote(sys.executable)} -c \"import time; time.sleep(2); print('done')\""
    spec = JobSpec(ray_cluster, f"attach-{tmp_path.name}", entry, {})
    first = run_job(spec, wait=False, note=lambda s: None)
    assert first.exit_code == 0 and first.status in ("PENDING", "RUNNING")
    lines: list[str] = []
    notes: list[str] = []
    second = run_job(spec, out=lines.append, note=notes.append)
    assert second.status == "SUCCEEDED" and second.exit_code == 0
    assert any("attaching" in n for n in notes) and "done" in "".join(lines)
    with pytest.raises(SubmitError, match="already ran"):
        run_job(spec, note=lambda s: None)
