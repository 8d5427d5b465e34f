"""A Ray Tune sweep over one stage; every trial is a Ray Train run of that stage.

Train V2 pattern (docs/ray.md): the trainable is a plain Tune function that builds and fits the
stage's ``TorchTrainer`` (through :func:`modula.trainers.runner.run_stage`) with a run name
ending in the trial id and ``TuneReportCallback`` forwarding its validation reports, so ASHA
sees them. The trial trains from the model's workspace (earlier stages' experts) and writes its
own experts to a workspace of its own (``work/tune-<sweep>-<trial>/``), so a sweep never touches
the model being trained.

The experiment lives at ``<storage.root>/tune/<name>`` (a stable path): ``resume=True`` restores
it after the driver died; finished trials are kept, unfinished ones run again and their Train
runs (stable names) resume from their last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from modula.basemodel import resolve_base_dir
from modula.config.loader import ConfigError, config_from_dict
from modula.config.schema import ModulaConfig
from modula.config.tuning import tune_section
from modula.data.build import ensure_data
from modula.infra.connect import connect
from modula.infra.layout import (
    TUNE,
    TUNE_TRIALS,
    expert_file,
    sweep_name,
    sweep_workspace,
    workspace_key,
)
from modula.infra.storage import Storage
from modula.trainers import PlanError, run_datasets, run_stage, stage_runs
from modula.tuning.report import write_outputs
from modula.tuning.results import SweepError, SweepResult, TrialRow
from modula.tuning.space import (
    apply_params,
    max_steps,
    param_space,
    report_count,
    stage_plan,
    trial_config,
)

__all__ = ["run_sweep"]

# which `modula train --stage` produces an expert a stage loads
_PRODUCER = {"universal": "universal"}


@dataclass
class _TrialSpec:
    """What every trial needs, shipped once through the object store."""

    cfg: ModulaConfig
    stage: str
    name: str | None  # registry name whose workspace holds the earlier stages' experts
    sweep: str
    datasets: dict[str, Any] | None = None  # the stage's inputs, materialized once


# ------------------------------------------------------------------------------------ trial


def _trial(config: dict[str, Any], spec: _TrialSpec) -> None:
    """The Tune function of one trial: one Ray Train run of the stage with the sampled values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    storage = Storage(spec.cfg.storage)
    record = f"{TUNE_TRIALS}/{spec.sweep}/{trial_id}"
    storage.write_text(f"{record}/start-{time.time_ns()}.json",
                       json.dumps({"pid": os.getpid(), "params": config, "time": time.time()}))
    cfg = trial_config(spec.cfg, spec.stage, config)
    plan, domains, _ = stage_plan(spec.stage)
    (run,) = stage_runs(cfg, plan, domains=domains, name=spec.name)[:1]
    run = replace(run, name=f"{run.name}-{trial_id}")  # stable per trial: a resume continues it
    t0 = time.time()
    (cost,) = run_stage(cfg, [run], storage, name=spec.name, console=Console(quiet=True),
                        show_progress=False, validate=True, callbacks=[TuneReportCallback()],
                        output_name=sweep_workspace(spec.sweep, trial_id), datasets=spec.datasets)
    storage.write_text(f"{record}/summary.json", json.dumps(
        {"run": run.name, "params": config, "wall_seconds": time.time() - t0,
         "cost": cost.to_dict()}, default=str))


# ------------------------------------------------------------------------------------ checks


def _check_inputs(cfg: ModulaConfig, storage: Storage, stage: str, name: str | None) -> Any:
    """The stage's run, once its earlier stages' experts are in the workspace."""
    plan, domains, _ = stage_plan(stage)
    try:
        runs = stage_runs(cfg, plan, domains=domains, name=name)
    except PlanError as exc:
        raise SweepError(f"cannot tune stage {stage!r}: {exc}") from None
    run = runs[0]
    key = workspace_key(cfg, name, run.variant)
    have = set(storage.list(key))
    missing = [n for n in run.inputs if f"{key}/{expert_file(n)}" not in have]
    if missing:
        first = _PRODUCER.get(missing[0], "domains")
        raise SweepError(
            f"stage {stage!r} builds on experts that are not trained yet: {', '.join(missing)} "
            f"(not in {storage.uri(key)}); train them first: "
            f"`modula train --stage {first}`"
            + (" then `modula train --stage domains`" if first == "universal"
               and any(m != "universal" for m in missing) else ""))
    return run


def _concurrency(cfg: ModulaConfig, stage: str, resources: dict[str, float]) -> int:
    """``max_concurrent_trials``, capped by how many trials' Train runs fit the cluster."""
    st = cfg.stages.get(tune_section(stage)).scaling
    res = cfg.tune.resources
    workers = res.num_workers or st.num_workers
    cpus = (res.cpus_per_worker or st.cpus_per_worker) * workers + res.driver_cpus
    fit = float(resources.get("CPU", 1)) // max(cpus, 1e-9)
    gpus = (res.gpus_per_worker if res.gpus_per_worker is not None else st.gpus_per_worker)
    if gpus:
        fit = min(fit, float(resources.get("GPU", 0)) // (gpus * workers))
    return int(max(1, min(cfg.tune.max_concurrent_trials, fit)))


def _search_alg(cfg: ModulaConfig, max_concurrent: int = 0) -> Any:
    alg = cfg.tune.search_alg
    if alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError(
                "tune.search_alg is 'optuna' but optuna is not installed: install the extra "
                "(pip install 'modula[tune-optuna]') or use search_alg random or grid") from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.tune.seed)
    from ray.tune.search import BasicVariantGenerator

    # a given generator does not take TuneConfig.max_concurrent_trials: it limits itself
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def _scheduler(cfg: ModulaConfig, stage: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = cfg.tune.scheduler
    if spec.type == "fifo":
        return FIFOScheduler()
    # one time unit = one validation report; max_t beyond the last report, so ASHA never stops
    # a trial that is about to finish (its last report carries the experts)
    max_t = spec.max_t or report_count(max_steps(cfg, stage), cfg.tune.report_every) + 1
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=min(spec.grace_period, max_t),
                         reduction_factor=spec.reduction_factor)


# ------------------------------------------------------------------------------------ sweep


def run_sweep(cfg: ModulaConfig, stage: str | None = None, storage: Storage | None = None,
              name: str | None = None, resume: bool = False, fresh: bool = False,
              output_dir: str | os.PathLike[str] | None = None, console: Any | None = None,
              source_raw: dict[str, Any] | None = None, verbose: int = 1) -> SweepResult:
    """Run (or with ``resume`` finish) the sweep of ``stage`` (default ``tune.stage``); write
    the results table (CSV, Markdown), the plot and the best trial's config to ``output_dir``
    (default ``<eval.output_dir>/tune/<sweep>``).

    ``source_raw``: the config file as written (before ``${ENV}`` interpolation); the best
    config is that file with the best values in place, so secrets stay references.
    """
    import ray.tune

    console = console or Console()
    stage = stage or cfg.tune.stage
    if stage != cfg.tune.stage:
        cfg = config_from_dict({**cfg.model_dump(mode="python"),
                                "tune": {**cfg.tune.model_dump(mode="python"), "stage": stage}},
                               source=f"(--stage {stage})")
    if resume and fresh:
        raise SweepError("resume and fresh exclude each other")
    storage = storage or Storage(cfg.storage)
    sweep = sweep_name(cfg, stage, name)
    run = _check_inputs(cfg, storage, stage, name)
    resolve_base_dir(cfg, storage)  # BaseModelMissing: `modula pretrain` first

    storage_path, fs = storage.ray_storage(TUNE)
    path = storage.uri(f"{TUNE}/{sweep}")
    restore_path = f"{storage_path.rstrip('/')}/{sweep}"
    exists = ray.tune.Tuner.can_restore(restore_path, storage_filesystem=fs)
    if fresh and exists:
        storage.delete_prefix(f"{TUNE}/{sweep}")
        storage.delete_prefix(f"{TUNE_TRIALS}/{sweep}")
        exists = False
    if resume and not exists:
        raise SweepError(f"no sweep to resume at {path} (start it without --resume)")
    if exists and not resume:
        raise SweepError(f"a sweep named {sweep!r} already exists at {path}: pass --resume to "
                         "finish it, or --fresh to delete it and start over")
    resources = connect(cfg.cluster)
    ensure_data(cfg, storage, sorted(set(run.data)))  # built once here, not raced by trials

    # save the experiment state often (Tune's "auto" waits >= 10 s): a driver that dies right
    # after a trial finished must not lose that trial
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # the inputs do not depend on the swept values: tokenized once, shared by every trial
    datasets = run_datasets(cfg, run, storage, validate=True)
    spec = _TrialSpec(cfg=cfg, stage=stage, name=name, sweep=sweep, datasets=datasets)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial, spec=spec),
        {"cpu": cfg.tune.resources.driver_cpus})
    concurrency = _concurrency(cfg, stage, resources)
    tune_cfg = cfg.tune
    console.print(f"sweep [bold]{sweep}[/]: stage {stage}, {tune_cfg.search_alg} search, "
                  f"{tune_cfg.scheduler.type} on {tune_cfg.metric_name} ({tune_cfg.mode_name}), "
                  f"up to {concurrency} trial(s) at once; {path}", highlight=False)
    if resume:
        tuner = ray.tune.Tuner.restore(restore_path, trainable=trainable,
                                       resume_unfinished=True, resume_errored=False,
                                       storage_filesystem=fs)
    else:
        grid = tune_cfg.search_alg == "grid"
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=ray.tune.TuneConfig(
                metric=tune_cfg.metric_name, mode=tune_cfg.mode_name,
                num_samples=1 if grid else tune_cfg.num_samples,
                max_concurrent_trials=concurrency,
                search_alg=_search_alg(cfg, concurrency), scheduler=_scheduler(cfg, stage),
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=ray.tune.RunConfig(
                name=sweep, storage_path=storage_path, storage_filesystem=fs, verbose=verbose,
                failure_config=ray.tune.FailureConfig(max_failures=0),
            ),
        )
    grid_result = tuner.fit()
    result = _collect(cfg, storage, stage, sweep, path, grid_result, resumed=resume)
    out = Path(output_dir) if output_dir else Path(cfg.eval.output_dir) / "tune" / sweep
    result.files = write_outputs(result, out, cfg, source_raw, console)
    return result


def _collect(cfg: ModulaConfig, storage: Storage, stage: str, sweep: str, path: str,
             grid: Any, resumed: bool) -> SweepResult:
    metric, mode = cfg.tune.metric_name, cfg.tune.mode_name
    section = tune_section(stage)
    rows: list[TrialRow] = []
    for res in grid:
        m = dict(res.metrics or {})
        trial_id = str(m.get("trial_id") or (Path(res.path).name if res.path else "?"))
        params = {k: res.config[k] for k in sorted(res.config or {})}
        steps = int(params.get("steps", cfg.stages.get(section).steps))
        steps_done = int(m.get("step", 0) or 0)
        record = f"{TUNE_TRIALS}/{sweep}/{trial_id}"
        keys = storage.list(record)
        summary: dict[str, Any] = {}
        if f"{record}/summary.json" in keys:
            try:
                summary = json.loads(storage.read_text(f"{record}/summary.json"))
            except (ValueError, FileNotFoundError):
                summary = {}
        value = m.get(metric)
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        if res.error is not None:
            status = "error"
        elif steps_done >= steps:
            status = "finished"
        elif steps_done > 0:
            status = "stopped early"
        else:
            status = "incomplete"
        cost = summary.get("cost") or {}
        rows.append(TrialRow(
            trial_id=trial_id, status=status, params=params, metric=value,
            steps_done=steps_done, steps=steps, reports=int(m.get("training_iteration", 0) or 0),
            starts=sum(1 for k in keys if k.rsplit("/", 1)[-1].startswith("start-")),
            wall_seconds=round(float(summary["wall_seconds"]), 1) if "wall_seconds" in summary
            else None,
            trainable_parameters=cost.get("trainable_parameters"),
            metrics={k: float(v) for k, v in m.items()
                     if (k.startswith("val_loss") or k == "loss") and isinstance(v, (int, float))},
            error=(str(res.error).strip().splitlines() or ["error"])[-1][:300]
            if res.error is not None else None,
            run_name=summary.get("run"),
        ))
    sign = 1 if mode == "min" else -1
    # finished trials first (a trial ASHA stopped early is judged on fewer steps), then by metric
    rows.sort(key=lambda r: (r.metric is None, r.status != "finished",
                             sign * (r.metric if r.metric is not None else 0.0), r.trial_id))
    for i, r in enumerate(rows, 1):
        r.rank = i
    best = next((r for r in rows if r.status == "finished" and r.metric is not None), None)
    best_cfg = None
    if best is not None:
        try:
            best_cfg = apply_params(cfg, stage, best.params)
        except ConfigError as exc:  # cannot happen for a trial that trained
            raise SweepError(f"the best trial's values do not validate: {exc}") from None
    return SweepResult(name=sweep, stage=stage, metric=metric, mode=mode, path=path,
                       trials=rows, best=best, best_config=best_cfg, resumed=resumed)
