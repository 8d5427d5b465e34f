"""Sweeps on Ray Tune: the search space from YAML, bad tune sections, the outputs; then real
sweeps whose trials are Ray Train runs: a small one (ranked, best config trains), ASHA stopping
a crafted bad trial early, and a sweep whose driver is killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modula.config import ConfigError, config_from_dict, load_config
from modula.infra.storage import Storage
from modula.tuning.results import SweepError, SweepResult, TrialRow
from modula.tuning.space import apply_params, param_space, report_count, trial_config
from modula.tuning.sweep import _check_inputs, _search_alg

TINY = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}
SPLITS = {"train": 48, "validation": 8, "test": 8}


def _raw(root: str, steps: int = 6, tune: dict | None = None) -> dict:
    stage = {"steps": steps, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 50,
             "max_failures": 0, "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    return {
        "storage": {"root": root},
        "cluster": {"dashboard": False},
        "model": {"tiny": TINY, "max_length": 96},
        "domains": [{"name": n, "splits": SPLITS} for n in ("general", "math", "units")],
        "stages": {s: dict(stage) for s in ("universal", "domain", "router", "lora", "molora")},
        "tune": {"stage": "universal", "report_every": 2, "max_concurrent_trials": 2,
                 "num_samples": 1,
                 "space": {"lr": {"type": "grid", "values": [3e-3, 3e-2]}}, **(tune or {})},
    }


# ------------------------------------------------------------------------------ unit


def test_space_from_yaml_becomes_tune_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = config_from_dict(_raw("/tmp/x", tune={"stage": "router", "space": {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        "steps": {"type": "randint", "low": 4, "high": 8},
        "batch_size": {"type": "qloguniform", "low": 2, "high": 16, "q": 2},
        "router_temperature": {"type": "choice", "values": [0.5, 1.0, 2.0]},
        "router_top_k": {"type": "grid", "values": [1, None]},
    }}))
    space = param_space(cfg)
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)
    assert "LogUniform" in type(space["lr"].get_sampler()).__name__
    assert isinstance(space["weight_decay"], Float)
    # randint's YAML high is included; Tune's upper bound is exclusive
    assert isinstance(space["steps"], Integer) and (space["steps"].lower, space["steps"].upper) == (4, 9)
    assert isinstance(space["batch_size"], Integer)  # a whole-number field stays whole
    assert isinstance(space["router_temperature"], Categorical)
    assert space["router_top_k"] == {"grid_search": [1, None]}
    for _ in range(20):
        v = space["steps"].sample()
        assert 4 <= v <= 8
        assert space["batch_size"].sample() % 2 == 0
    # under search_alg grid a choice is enumerated
    grid = config_from_dict(_raw("/tmp/x", tune={"search_alg": "grid", "space": {
        "lr": {"type": "choice", "values": [1e-3, 1e-2]}}}))
    assert param_space(grid) == {"lr": {"grid_search": [1e-3, 1e-2]}}


def test_trial_values_land_on_a_typed_config_copy():
    cfg = config_from_dict(_raw("/tmp/x", steps=20, tune={"stage": "router", "report_every": 5,
                                                          "resources": {"cpus_per_worker": 0.5}}))
    t = apply_params(cfg, "router", {"lr": 0.01, "router_temperature": 2.0, "router_top_k": 1.0,
                                     "batch_size": 7.6, "steps": 3.0})
    assert t.stages.router.lr == 0.01 and t.stages.router.batch_size == 8
    assert t.stages.router.steps == 3 and t.stages.router.warmup_steps == 1
    assert t.modula.router.temperature == 2.0 and t.modula.router.top_k == 1
    assert cfg.stages.router.lr != 0.01  # the original is untouched
    d = apply_params(cfg, "domain:math", {"domain_rank": 4, "domain_alpha": 8, "dropout": 0.1})
    assert (d.modula.domain_rank, d.modula.domain_alpha, d.modula.dropout) == (4, 8.0, 0.1)
    tc = trial_config(cfg, "router", {"lr": 0.01})
    assert tc.stages.router.checkpoint_every == 5  # the loop reports at checkpoints
    assert tc.stages.router.scaling.cpus_per_worker == 0.5
    assert report_count(20, 5) == 4 and report_count(7, 2) == 4 and report_count(3, 10) == 1
    with pytest.raises(ConfigError, match="stages.router.lr"):
        apply_params(cfg, "router", {"lr": 5.0})


@pytest.mark.parametrize("tune,where,fragment", [
    ({"stage": "domain:general"}, "tune.stage", "domain:<one of math, units>"),
    ({"stage": "everything"}, "tune.stage", "allowed: universal, router, lora, molora"),
    ({"stage": "router", "space": {"universal_rank": {"type": "choice", "values": [4]}}},
     "tune.space", "allowed for this stage: lr, batch_size"),
    ({"space": {"momentum": {"type": "choice", "values": [1]}}}, "tune.space", "allowed: lr"),
    ({"space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 2}}}, "tune.space.lr",
     "not a valid stages.universal.lr (Input should be less than 1)"),
    ({"space": {"lr": {"type": "loguniform", "low": 0, "high": 0.1}}}, "tune.space.lr",
     "loguniform needs low > 0"),
    ({"space": {"lr": {"type": "qloguniform", "low": 1e-4, "high": 0.1}}}, "tune.space.lr",
     "needs `q`"),
    ({"space": {"steps": {"type": "randint", "low": 1.5, "high": 4}}}, "tune.space.steps",
     "whole numbers"),
    ({"space": {"batch_size": {"type": "choice", "values": [0, 4]}}}, "tune.space.batch_size",
     "greater than or equal to 1"),
    ({"space": {"lr": {"type": "grid"}}}, "tune.space.lr", "non-empty `values`"),
    ({"stage": "router", "space": {"router_top_k": {"type": "choice", "values": [1, 3]}}},
     "tune.space.router_top_k", "more than the number of experts (2)"),
    ({"search_alg": "grid", "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}},
     "tune", "allowed with grid: grid, choice"),
    ({"search_alg": "optuna"}, "tune", "use type choice"),
    ({"search_alg": "bayes"}, "tune.search_alg", "'random', 'grid' or 'optuna'"),
    ({"metric": "accuracy"}, "tune.metric", "allowed: val_loss, loss, val_loss_general"),
    ({"scheduler": {"type": "hyperband"}}, "tune.scheduler.type", "'asha' or 'fifo'"),
    ({"resources": {"driver_cpus": -1}}, "tune.resources.driver_cpus", "greater than or equal"),
    ({"name": "../escape"}, "tune.name", "does not match"),
])
def test_bad_tune_sections_name_the_field_and_the_allowed_values(tune, where, fragment):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(_raw("/tmp/x", tune=tune))
    text = "\n".join(exc.value.problems)
    assert text.startswith(where), text
    assert fragment in text, text


def test_optuna_is_an_optional_extra():
    cfg = config_from_dict(_raw("/tmp/x", tune={"search_alg": "optuna", "space": {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SweepError, match=r"modula\[tune-optuna\]"):
            _search_alg(cfg)
    else:
        assert type(_search_alg(cfg)).__name__ == "OptunaSearch"
    assert type(_search_alg(config_from_dict(_raw("/tmp/x")))).__name__ == "BasicVariantGenerator"


def test_a_stage_without_its_earlier_experts_says_what_to_train_first(tmp_path):
    cfg = config_from_dict(_raw(str(tmp_path)))
    st = Storage(cfg.storage)
    with pytest.raises(SweepError, match=r"universal, math, units .*`modula train --stage universal` "
                                         r"then `modula train --stage domains`"):
        _check_inputs(cfg, st, "router", None)
    with pytest.raises(SweepError, match=r"universal \(not in .*`modula train --stage universal`"):
        _check_inputs(cfg, st, "domain:math", None)
    st.write_bytes("work/modula/res/universal.safetensors", b"x")
    assert _check_inputs(cfg, st, "domain:math", None).trains == ("math",)
    with pytest.raises(SweepError, match=r"math, units .*`modula train --stage domains`"):
        _check_inputs(cfg, st, "router", None)
    assert _check_inputs(cfg, st, "universal", None).inputs == ()
    with pytest.raises(SweepError, match="modula.variant is 'lora'"):
        _check_inputs(config_from_dict({**_raw(str(tmp_path)), "modula": {"variant": "lora"}}),
                      st, "universal", None)


def test_cli_fails_fast_and_clearly(tmp_path):
    from typer.testing import CliRunner

    from modula.cli import app

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_raw(str(tmp_path / "runs"))))
    runner = CliRunner()
    out = runner.invoke(app, ["tune", "--config", str(f), "--stage", "domain:nope"])
    assert out.exit_code == 2 and "tune.stage: 'domain:nope' is not a stage" in out.output
    out = runner.invoke(app, ["tune", "--config", str(f), "--stage", "router"])
    assert out.exit_code == 1, out.output
    assert "modula train --stage universal" in out.output.replace("\n", " ")
    out = runner.invoke(app, ["tune", "--config", str(f), "--set",
                              "tune.space.lr.high=3", "--set", "tune.space.lr.type=uniform",
                              "--set", "tune.space.lr.low=0.1", "--set", "tune.space.lr.values=null"])
    assert out.exit_code == 2 and "tune.space.lr: 3.0 is not a valid stages.universal.lr" in out.output


def test_outputs_table_csv_markdown_plot_and_best_config(tmp_path, monkeypatch):
    from modula.tuning.report import write_outputs

    monkeypatch.setenv("TUNE_TEST_ROOT", str(tmp_path / "runs"))
    raw = _raw("${TUNE_TEST_ROOT}", tune={"space": {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
        "universal_rank": {"type": "choice", "values": [4, 8]}}})
    cfg = config_from_dict(raw)
    trials = [
        TrialRow("t_00001", "finished", {"lr": 3e-3, "universal_rank": 8}, 2.5, 6, 6, 3,
                 metrics={"val_loss": 2.5, "val_loss_general": 2.5}),
        TrialRow("t_00000", "finished", {"lr": 1e-4, "universal_rank": 4}, 3.0, 6, 6, 3),
        TrialRow("t_00002", "stopped early", {"lr": 0.09, "universal_rank": 4}, 9.0, 2, 6, 1),
        TrialRow("t_00003", "error", {"lr": 0.05, "universal_rank": 8}, None, 0, 6, 0,
                 error="boom"),
    ]
    for i, t in enumerate(trials, 1):
        t.rank = i
    result = SweepResult("s", "universal", "val_loss", "min", str(tmp_path / "exp"), trials,
                         trials[0], apply_params(cfg, "universal", trials[0].params))
    from rich.console import Console

    console = Console(record=True, width=160)
    files = write_outputs(result, tmp_path / "out", cfg, source_raw=raw, console=console)
    assert set(files) == {"csv", "plot", "best_config", "markdown"}
    shown = console.export_text()
    assert "t_00001" in shown and "stopped early" in shown and "lower is better" in shown
    import csv

    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["trial_id"] for r in rows] == ["t_00001", "t_00000", "t_00002", "t_00003"]
    assert rows[0]["val_loss_general"] == "2.5" and rows[3]["error"] == "boom"
    md = files["markdown"].read_text()
    assert "| 1 | t_00001 | finished |" in md and "best.yaml" in md
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    text = files["best_config"].read_text()
    assert "${TUNE_TEST_ROOT}" in text  # the file as written, not its resolved values
    best = load_config(files["best_config"])
    assert best.stages.universal.lr == 3e-3 and best.modula.universal_rank == 8
    assert best.storage.root == str(tmp_path / "runs")
    # without the source file: the resolved config, secrets left out
    raw2 = _raw(str(tmp_path / "r2"))
    raw2["storage"] |= {"root": "s3://bucket-x/p", "access_key_id": "AKIA", "secret_access_key": "s3cr3t"}
    cfg2 = config_from_dict(raw2)
    result.best_config = apply_params(cfg2, "universal", trials[0].params)
    files = write_outputs(result, tmp_path / "out2", cfg2)
    text = files["best_config"].read_text()
    assert "s3cr3t" not in text and "AKIA" not in text
    assert load_config(files["best_config"]).modula.universal_rank == 8


# ------------------------------------------------------------------------------ integration


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Llama with the built-in tokenizer, saved like any HF model directory."""
    from modula.basemodel import build_model
    from modula.data.build import ensure_tokenizer
    from modula.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tune-base-data")
    cfg = config_from_dict(_raw(str(root)))
    st = Storage(cfg.storage)
    tok = load_tokenizer(st.uri(ensure_tokenizer(cfg, st)))
    out = tmp_path_factory.mktemp("tune-tiny-base")
    build_model(cfg.model.tiny, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(tmp_path: Path, tiny_base: Path, **kw) -> tuple[dict, object]:
    raw = _raw(str(tmp_path / "runs"), **kw)
    raw["model"]["base"] = str(tiny_base)
    return raw, config_from_dict(raw)


def _starts(storage: Storage, sweep: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for k in storage.list(f"tune/_trials/{sweep}"):
        if k.rsplit("/", 1)[-1].startswith("start-"):
            out.setdefault(k.split("/")[-2], []).append(json.loads(storage.read_text(k))["time"])
    return out


@pytest.mark.integration
def test_small_sweep_ranks_trials_and_its_best_config_trains(ray_local, tiny_base, tmp_path):
    from typer.testing import CliRunner

    from modula.cli import app
    from modula.tuning import run_sweep

    raw, cfg = _cfg(tmp_path, tiny_base, tune={
        "max_concurrent_trials": 3,
        "scheduler": {"type": "fifo"},
        "resources": {"cpus_per_worker": 1},
        "space": {"lr": {"type": "grid", "values": [1e-3, 1e-2, 3e-2]}}})
    res = run_sweep(cfg, output_dir=tmp_path / "out", source_raw=raw, verbose=0)
    assert len(res.trials) == 3
    assert all(t.status == "finished" and t.metric is not None for t in res.trials)
    assert [t.rank for t in res.trials] == [1, 2, 3]
    assert [t.metric for t in res.trials] == sorted(t.metric for t in res.trials)
    assert sorted(t.params["lr"] for t in res.trials) == [1e-3, 1e-2, 3e-2]
    best = res.best
    assert best is res.trials[0] and best.reports == 3 and best.steps_done == 6
    # the universal stage validates on general: its loss is the tuned metric
    assert best.metrics["val_loss"] == pytest.approx(best.metrics["val_loss_general"])
    # trials ran side by side
    storage = Storage(cfg.storage)
    starts = _starts(storage, res.name)
    assert len(starts) == 3 and all(len(v) == 1 for v in starts.values())
    first_two = sorted(v[0] for v in starts.values())[:2]
    assert first_two[1] - first_two[0] < min(t.wall_seconds for t in res.trials)
    # trials never touch the model's workspace; each keeps its experts in its own
    assert not storage.list("work/modula/res")
    assert all(storage.exists(f"work/tune-{res.name}-{t.trial_id}/res/universal.safetensors")
               for t in res.trials)
    # outputs
    assert {"csv", "markdown", "plot", "best_config"} <= set(res.files)
    assert res.files["plot"].stat().st_size > 5000
    best_cfg = load_config(res.files["best_config"])
    assert best_cfg.stages.universal.lr == best.params["lr"]
    # the best config trains: `modula train --config best.yaml`
    out = CliRunner().invoke(app, ["train", "--config", str(res.files["best_config"]),
                                   "--stage", "universal", "--no-publish"])
    assert out.exit_code == 0, out.output
    assert storage.exists("work/modula/res/universal.safetensors")
    cost = json.loads(storage.read_text(storage.list("work/modula/res/costs")[0]))
    assert cost["steps"] == 6
    # the same sweep again is refused without --resume / --fresh
    with pytest.raises(SweepError, match="--resume to finish it, or --fresh"):
        run_sweep(cfg, output_dir=tmp_path / "out", verbose=0)


@pytest.mark.integration
@pytest.mark.slow
def test_asha_stops_a_bad_trial_early(ray_local, tiny_base, tmp_path):
    from modula.tuning import run_sweep

    # one trial after the other: the good one sets the bar at every rung, then a learning
    # rate too small to learn anything is cut at its first report (training is seeded: the
    # same losses every time)
    _, cfg = _cfg(tmp_path, tiny_base, steps=8, tune={
        "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"lr": {"type": "grid", "values": [1e-2, 1e-6]}}})
    res = run_sweep(cfg, output_dir=tmp_path / "out", verbose=0)
    by_lr = {t.params["lr"]: t for t in res.trials}
    good, bad = by_lr[1e-2], by_lr[1e-6]
    assert good.status == "finished" and good.reports == 4 and good.steps_done == 8
    assert bad.status == "stopped early", bad
    # cut at its first rung (a report already on its way may still be counted)
    assert bad.reports <= 2 and bad.steps_done <= 4
    assert bad.metric > good.metric
    assert res.best is good and res.stopped_early == [bad]
    assert "stopped early" in res.files["markdown"].read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(ray_local, tiny_base, tmp_path):
    import ray

    from modula.tuning import run_sweep

    # one trial after the other: a short one, then a long one that is killed mid-run
    raw, cfg = _cfg(tmp_path, tiny_base, steps=6, tune={
        "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
        "space": {"steps": {"type": "grid", "values": [6, 20]}}})
    raw["cluster"]["address"] = ray.get_runtime_context().gcs_address
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    storage = Storage(cfg.storage)
    sweep = "modula-res-universal"
    exp, trials = tmp_path / "runs/tune" / sweep, tmp_path / "runs/tune/_trials" / sweep
    env = {**os.environ, "RAY_ADDRESS": raw["cluster"]["address"]}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "modula.cli", "tune", "--config", str(cfg_file),
         "--output", str(tmp_path / "out1")],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)

    def terminated() -> int:  # trials the driver's saved experiment state records as done
        n = 0
        for f in exp.glob("experiment_state-*.json") if exp.is_dir() else []:
            try:
                n = max(n, f.read_text().count('\\"TERMINATED\\"'))
            except OSError:
                pass
        return n

    def running_with_checkpoints() -> str | None:  # an unfinished trial's Train run, midway
        for d in (tmp_path / "runs/runs/train").glob("*_*"):
            tid = d.name.rsplit("-", 1)[-1]
            if not (trials / tid / "summary.json").exists() and sum(
                    p.name.startswith("checkpoint_") for p in d.iterdir()) >= 3:
                return tid
        return None

    deadline = time.time() + 300
    try:
        while not (terminated() >= 1 and (killed := running_with_checkpoints())):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "the sweep did not get there in time"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep
        driver.wait()
    before = _starts(storage, sweep)
    finished = [t for t in before if (trials / t / "summary.json").exists()]
    assert len(finished) == 1 and killed not in finished
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(cfg, output_dir=tmp_path / "out", verbose=0)
    res = run_sweep(cfg, resume=True, output_dir=tmp_path / "out", verbose=0)
    assert res.resumed and len(res.trials) == 2
    assert all(t.status == "finished" for t in res.trials), res.trials
    after = _starts(storage, sweep)
    # the finished trial was not run again; the killed one ran again, and its Train run went on
    # from its last checkpoint
    assert after[finished[0]] == before[finished[0]]
    assert len(after[killed]) == 2
    summary = json.loads((trials / killed / "summary.json").read_text())
    assert summary["cost"]["resumed"] >= 1 and summary["cost"]["steps"] == 20
    assert {t.trial_id: t.starts for t in res.trials} == {finished[0]: 1, killed: 2}
    assert res.best is not None and res.files["best_config"].is_file()
