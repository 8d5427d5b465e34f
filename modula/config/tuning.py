"""What a sweep may tune, per stage, and where each tunable lands in the config.

The schema checks ``tune.space`` against these rules when a config loads (:func:`check_tune`),
so a value that a stage does not train, or that its field would refuse, fails at load time with
the field's own rule; :mod:`modula.tuning` samples and applies values through the same table.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

__all__ = [
    "TUNABLE",
    "TUNABLE_BY_STAGE",
    "TUNE_INTEGER",
    "TUNE_STAGES",
    "TUNE_TARGETS",
    "check_tune",
    "tune_section",
    "tune_target",
]

TUNABLE = (
    "lr", "universal_rank", "domain_rank", "universal_alpha", "domain_alpha", "dropout",
    "router_temperature", "router_top_k", "batch_size", "steps", "weight_decay",
)

# where each tunable lands in the config; "{section}" is the tuned stage's `stages` section
TUNE_TARGETS: dict[str, tuple[str, ...]] = {
    "lr": ("stages", "{section}", "lr"),
    "batch_size": ("stages", "{section}", "batch_size"),
    "steps": ("stages", "{section}", "steps"),
    "weight_decay": ("stages", "{section}", "weight_decay"),
    "universal_rank": ("modula", "universal_rank"),
    "domain_rank": ("modula", "domain_rank"),
    "universal_alpha": ("modula", "universal_alpha"),
    "domain_alpha": ("modula", "domain_alpha"),
    "dropout": ("modula", "dropout"),
    "router_temperature": ("modula", "router", "temperature"),
    "router_top_k": ("modula", "router", "top_k"),
}
# tunables whose values are whole numbers (a continuous distribution is rounded)
TUNE_INTEGER = ("universal_rank", "domain_rank", "batch_size", "steps", "router_top_k")

_COMMON = ("lr", "batch_size", "steps", "weight_decay", "dropout")
# what each stage can tune: a value that the stage does not train (the rank of a frozen expert
# it loads, the router of a stage without one) would be a no-op or a shape mismatch
TUNABLE_BY_STAGE: dict[str, tuple[str, ...]] = {
    "universal": (*_COMMON, "universal_rank", "universal_alpha"),
    "domain": (*_COMMON, "domain_rank", "domain_alpha"),
    "router": (*_COMMON, "router_temperature", "router_top_k"),
    "lora": (*_COMMON, "universal_rank", "universal_alpha"),
    "molora": (*_COMMON, "domain_rank", "domain_alpha", "router_temperature", "router_top_k"),
}

# the stages a sweep can tune besides domain:<name>
TUNE_STAGES = ("universal", "router", "lora", "molora")


def tune_section(stage: str) -> str:
    """The ``stages`` section a tune stage trains with (``domain:<name>`` -> ``domain``)."""
    return "domain" if stage.startswith("domain:") else stage


def tune_target(key: str, stage: str) -> tuple[str, ...]:
    """The config path a tunable of `stage` writes (``lr`` of ``router``: stages.router.lr)."""
    section = tune_section(stage)
    return tuple(p.replace("{section}", section) for p in TUNE_TARGETS[key])


def _n_experts(cfg: Any) -> int:
    return len(cfg.expert_domains(include_reserved=True)) + (1 if cfg.modula.variant == "flan" else 0)


def check_tune(cfg: Any) -> None:
    """The tune section against the rest of a ModulaConfig: the stage, what it can tune, the
    metric, and every candidate value against the field it lands on. Raises ValueError (the
    schema's validator turns it into a config problem)."""
    tune = cfg.tune
    experts = cfg.expert_domains(include_reserved=True)
    if tune.stage not in TUNE_STAGES and not (
        tune.stage.startswith("domain:") and tune.stage[7:] in experts
    ):
        raise ValueError(
            f"tune.stage: {tune.stage!r} is not a stage (allowed: "
            f"{', '.join(TUNE_STAGES)}, domain:<one of {', '.join(experts)}>)"
        )
    allowed = TUNABLE_BY_STAGE[tune_section(tune.stage)]
    wrong = sorted(set(tune.space) - set(allowed))
    if wrong:
        raise ValueError(
            f"tune.space: stage {tune.stage!r} does not train {wrong} "
            f"(allowed for this stage: {', '.join(allowed)})"
        )
    names = {x.name for x in cfg.domains}
    metrics = ["val_loss", "loss",
               *(f"val_loss_{d}" for d in ("general", *experts) if d in names)]
    if tune.metric is not None and tune.metric not in metrics:
        raise ValueError(
            f"tune.metric: {tune.metric!r} is not reported (allowed: {', '.join(metrics)})"
        )
    n_experts = _n_experts(cfg)
    for key, dim in tune.space.items():
        path = tune_target(key, tune.stage)
        owner: Any = cfg
        for p in path[:-1]:
            owner = getattr(owner, p)
        field = type(owner).model_fields[path[-1]]
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)]
                              if field.metadata else field.annotation)
        for v in dim.candidates():
            if key in TUNE_INTEGER and isinstance(v, float) and v.is_integer():
                v = int(v)
            if key in TUNE_INTEGER and dim.type in ("loguniform", "uniform", "qloguniform"):
                v = round(v)
            try:
                adapter.validate_python(v)
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(
                    f"tune.space.{key}: {v!r} is not a valid {'.'.join(path)} ({msg})"
                ) from None
            if key == "router_top_k" and v is not None and v > n_experts:
                raise ValueError(
                    f"tune.space.router_top_k: {v} is more than the number of experts "
                    f"({n_experts})"
                )
