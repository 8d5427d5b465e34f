"""What a stage is made of: the Ray Train runs, what each trains and on which data.

A *run* is one ``TorchTrainer.fit``. Stages map to runs as the paper trains them:

- ``universal``: one run, the universal expert alone, on ``general``;
- ``domains``: every domain expert, independently (docs/method.md, stage 2). One run per domain, or
  ``stages.domain.domains_per_run`` experts packed into one run (each batch pinned to its own
  domain, so each expert still sees only its own data); runs execute side by side as far as the
  cluster's resources allow;
- ``router``: one run, all experts frozen, only the routers, on a mix of every domain plus a
  ``general_fraction`` of general data;
- ``lora`` / ``molora``: the baselines, one joint run on all data mixed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from modula.config.schema import ModulaConfig, StageConfig
from modula.infra.layout import model_name
from modula.trainers.common import PlanError

__all__ = ["STAGE_CHOICES", "StageRun", "plan_stage", "stage_runs"]

# the request router: trained by the router stage of a MoDULA variant, with the routers
CLASSIFIER = "classifier"
STAGE_CHOICES = ("universal", "domains", "router", "all", "lora", "molora")


@dataclass(frozen=True)
class StageRun:
    """One Ray Train run of a stage."""

    stage: str  # universal | domains | router | lora | molora
    section: str  # the config section: universal | domain | router | lora | molora
    variant: str  # the variant of the model the run builds
    domains: tuple[str, ...]  # the model's domain experts, in router order
    trains: tuple[str, ...]  # experts written at the end: universal | <domain> | routers
    data: tuple[str, ...]  # domains whose train split feeds the run ("general" included)
    pinned: tuple[str, ...] = ()  # packed domain run: one data stream per domain, rows pinned
    inputs: tuple[str, ...] = ()  # experts loaded before training (trained by earlier stages)
    name: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def model_stage(self) -> str | None:
        """What ``ModulaModel.set_stage`` receives (None: trainable set by hand, packed runs)."""
        if self.stage == "universal":
            return "universal"
        if self.stage == "router":
            return "router"
        if self.stage in ("lora", "molora"):
            return "joint"
        if len(self.trains) == 1:
            return f"domain:{self.trains[0]}"
        return None


def _fingerprint(cfg: ModulaConfig, section: StageConfig, *parts: object) -> str:
    """A stable run name suffix: same config, same name (so a rerun resumes the run)."""
    blob = json.dumps(
        [cfg.model.base, cfg.model.tiny.model_dump(mode="json"), cfg.modula.model_dump(mode="json"),
         section.model_dump(mode="json"), [str(p) for p in parts]],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _stage_domains(cfg: ModulaConfig, section: StageConfig) -> list[str]:
    experts = cfg.expert_domains()
    if section.domains is None:
        return experts
    chosen = [d for d in section.domains if d != "general"]
    unknown = [d for d in chosen if d not in cfg.expert_domains(include_reserved=True)]
    if unknown:
        raise PlanError(f"stages: {unknown} are not domain experts (experts: {experts})")
    return chosen


def stage_runs(cfg: ModulaConfig, stage: str, domains: list[str] | None = None,
               name: str | None = None) -> list[StageRun]:
    """The runs of one stage (not ``all``: see :func:`plan_stage`)."""
    variant = cfg.modula.variant
    mname = name or model_name(cfg)
    if stage in ("lora", "molora"):
        section = cfg.stages.get(stage)
        ds = domains or _stage_domains(cfg, section)
        trains = ("universal",) if stage == "lora" else tuple(ds) + ("routers",)
        run = StageRun(stage=stage, section=stage, variant=stage,
                       domains=() if stage == "lora" else tuple(ds), trains=trains,
                       data=("general", *ds))
        return [_named(cfg, run, mname)]
    if variant not in ("flan", "res"):
        raise PlanError(
            f"stage {stage!r} is a MoDULA stage, but modula.variant is {variant!r} "
            "(train the baselines with --stage lora / --stage molora)"
        )
    all_domains = tuple(domains or cfg.expert_domains())
    if stage == "universal":
        section = cfg.stages.universal
        run = StageRun(stage="universal", section="universal", variant=variant,
                       domains=all_domains, trains=("universal",), data=("general",))
        return [_named(cfg, run, mname)]
    if stage == "domains":
        section = cfg.stages.domain
        chosen = list(domains or _stage_domains(cfg, section))
        per = section.domains_per_run
        runs = []
        for i in range(0, len(chosen), per):
            group = tuple(chosen[i:i + per])
            runs.append(_named(cfg, StageRun(
                stage="domains", section="domain", variant=variant, domains=all_domains,
                trains=group, data=group, pinned=group if len(group) > 1 else (),
                inputs=("universal",)), mname))
        return runs
    if stage == "router":
        section = cfg.stages.router
        run = StageRun(stage="router", section="router", variant=variant, domains=all_domains,
                       trains=("routers", CLASSIFIER), data=("general", *all_domains),
                       inputs=("universal", *all_domains))
        return [_named(cfg, run, mname)]
    raise PlanError(f"unknown stage {stage!r} (allowed: {', '.join(STAGE_CHOICES)})")


def _named(cfg: ModulaConfig, run: StageRun, mname: str) -> StageRun:
    section = cfg.stages.get(run.section)
    label = run.stage if run.stage != "domains" else "domain-" + "-".join(run.trains)
    fp = _fingerprint(cfg, section, run.variant, run.domains, run.trains, run.data)
    return StageRun(**{**run.__dict__, "name": f"{mname}-{run.variant}-{label}-{fp}"})


def plan_stage(cfg: ModulaConfig, stage: str, name: str | None = None) -> list[list[StageRun]]:
    """The stage's runs in order: a list of waves; the runs of one wave are independent."""
    if stage == "all":
        if cfg.modula.variant in ("lora", "molora"):
            return [stage_runs(cfg, cfg.modula.variant, name=name)]
        return [stage_runs(cfg, s, name=name) for s in ("universal", "domains", "router")]
    return [stage_runs(cfg, stage, name=name)]
