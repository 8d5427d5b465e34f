"""Ray Train stage runners: stage 0 (the built-in base model), the three MoDULA stages and the
baselines, ``add-domain``, and publishing to the registry.

- :mod:`~modula.trainers.plan`: what a stage is made of (its Ray Train runs);
- :mod:`~modula.trainers.runner`: driving the runs, the workspace, publishing, ``add_domain``;
- :mod:`~modula.trainers.loop` / :mod:`~modula.trainers.pretrain`: the worker loops;
- :mod:`~modula.trainers.common`: what both loops share (schedule, AdamW, checkpoints, metrics);
- :mod:`~modula.trainers.progress`: live progress of Ray Train runs on the driver.
"""

from modula.trainers.common import CheckpointError, MetricsLog, PlanError, StageError
from modula.trainers.plan import STAGE_CHOICES, StageRun, plan_stage, stage_runs
from modula.trainers.pretrain import PretrainResult, run_pretrain
from modula.trainers.runner import RunCost, add_domain, publish, run_datasets, run_stage, train

__all__ = [
    "STAGE_CHOICES",
    "CheckpointError",
    "MetricsLog",
    "PlanError",
    "PretrainResult",
    "RunCost",
    "StageError",
    "StageRun",
    "add_domain",
    "plan_stage",
    "publish",
    "run_datasets",
    "run_pretrain",
    "run_stage",
    "stage_runs",
    "train",
]
