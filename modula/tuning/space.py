"""The search space of a sweep: ``tune.space`` as Ray Tune distributions, and one trial's sampled
values written onto a typed copy of the config (every value validated by the same schema).

Ray-free except :func:`param_space`, which imports ``ray.tune`` when called.
"""

from __future__ import annotations

import math
from typing import Any

from modula.config import ConfigError, ModulaConfig, config_from_dict
from modula.config.schema import SearchDimension
from modula.config.tuning import TUNE_INTEGER, TUNE_TARGETS, tune_section, tune_target

__all__ = ["param_space", "apply_params", "trial_config", "stage_plan", "max_steps",
           "report_count", "coerce_value"]


def stage_plan(stage: str) -> tuple[str, list[str] | None, str]:
    """A tune stage as the trainers name it: (plan stage, its domains, ``stages`` section)."""
    if stage.startswith("domain:"):
        return "domains", [stage[len("domain:"):]], "domain"
    return stage, None, stage


def _dimension(key: str, dim: SearchDimension) -> Any:
    from ray import tune

    integer = key in TUNE_INTEGER
    lo, hi = dim.low, dim.high
    if dim.type == "choice":
        return tune.choice(list(dim.values or []))
    if dim.type == "grid":
        return tune.grid_search(list(dim.values or []))
    if dim.type == "randint":  # YAML's high is included; Tune's is not
        return tune.randint(int(lo), int(hi) + 1)
    if dim.type == "uniform":
        return tune.randint(math.ceil(lo), math.floor(hi) + 1) if integer else tune.uniform(lo, hi)
    if dim.type == "loguniform":
        return tune.lograndint(math.ceil(lo), math.floor(hi) + 1) if integer \
            else tune.loguniform(lo, hi)
    if dim.type == "qloguniform":
        if integer:
            return tune.qlograndint(math.ceil(lo), math.floor(hi), max(1, round(dim.q or 1)))
        return tune.qloguniform(lo, hi, dim.q)
    raise ValueError(f"tune.space.{key}: unknown type {dim.type!r}")


def param_space(cfg: ModulaConfig) -> dict[str, Any]:
    """``tune.space`` as a Tune ``param_space``. Under ``search_alg: grid`` a ``choice`` is
    enumerated like a ``grid``."""
    from ray import tune

    out = {}
    for key, dim in cfg.tune.space.items():
        if cfg.tune.search_alg == "grid" and dim.type == "choice":
            out[key] = tune.grid_search(list(dim.values or []))
        else:
            out[key] = _dimension(key, dim)
    return out


def coerce_value(key: str, value: Any) -> Any:
    """A sampled value as the config field wants it (whole numbers for ranks, steps, ...)."""
    if value is None:
        return None
    if hasattr(value, "item"):  # numpy scalars from a sampler
        value = value.item()
    if key in TUNE_INTEGER and isinstance(value, float):
        return int(round(value))
    return value


def apply_params(cfg: ModulaConfig, stage: str, params: dict[str, Any]) -> ModulaConfig:
    """A copy of ``cfg`` with a trial's values in place; raises ConfigError naming the field."""
    section = tune_section(stage)
    raw = cfg.model_dump(mode="python")
    unknown = sorted(set(params) - set(TUNE_TARGETS))
    if unknown:
        raise ConfigError([f"tune.space: cannot tune {unknown} "
                           f"(allowed: {', '.join(TUNE_TARGETS)})"])
    for key, value in params.items():
        path = tune_target(key, stage)
        node = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = coerce_value(key, value)
    stage_raw = raw["stages"][section]
    # a shorter run keeps a valid warmup
    stage_raw["warmup_steps"] = min(stage_raw["warmup_steps"], stage_raw["steps"])
    return config_from_dict(raw, source=f"(trial of {stage})")


def trial_config(cfg: ModulaConfig, stage: str, params: dict[str, Any]) -> ModulaConfig:
    """What one trial trains with: the sampled values, validation reports every
    ``tune.report_every`` steps (the loop reports at checkpoints) and ``tune.resources``."""
    out = apply_params(cfg, stage, params)
    section = tune_section(stage)
    st = out.stages.get(section)
    res = cfg.tune.resources
    scaling = st.scaling.model_copy(update={
        k: v for k, v in (("num_workers", res.num_workers),
                          ("cpus_per_worker", res.cpus_per_worker),
                          ("gpus_per_worker", res.gpus_per_worker)) if v is not None})
    new_stage = st.model_copy(update={"checkpoint_every": min(cfg.tune.report_every, st.steps),
                                      "scaling": scaling})
    stages = out.stages.model_copy(update={section: new_stage})
    return out.model_copy(update={"stages": stages})


def max_steps(cfg: ModulaConfig, stage: str) -> int:
    """The longest run a trial can be (``steps`` may be tuned)."""
    dim = cfg.tune.space.get("steps")
    if dim is None:
        return cfg.stages.get(tune_section(stage)).steps
    return int(max(dim.candidates()))


def report_count(steps: int, report_every: int) -> int:
    """How many validation reports a run of ``steps`` steps makes."""
    every = min(report_every, steps)
    return steps // every + (1 if steps % every else 0)
