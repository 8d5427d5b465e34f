"""Ray Train stage runners: stage 0 (the built-in base model), the three MoDULA stages and the
baselines, ``add-domain``, and publishing to the registry.

- :mod:`~modula.trainers.plan`: what a stage is made of (its Ray Train runs);
- :mod:`~modula.trainers.runner`: driving the runs, the workspace, publishing, ``add_domain``;
- :mod:`~modula.trainers.loop` / :mod:`~modula.trainers.pretrain`: the worker loops;
- :mod:`~modula.trainers.common`: what both loops share (schedule, AdamW, one accumulated step
  in the stage's precision, checkpoints, metrics);
- :mod:`~modula.trainers.progress`: live progress of Ray Train runs on the driver.

Importing this package imports none of them; the names below load on first use, so
``modula.trainers.common`` stays importable without Ray, pyarrow or rich (the GPU check,
``benchmarks/gpu_check.py``, runs its training step).
"""

from __future__ import annotations

import importlib
from typing import Any

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

_LAZY = {
    **dict.fromkeys(("CheckpointError", "MetricsLog", "PlanError", "StageError"),
                    "modula.trainers.common"),
    **dict.fromkeys(("STAGE_CHOICES", "StageRun", "plan_stage", "stage_runs"),
                    "modula.trainers.plan"),
    **dict.fromkeys(("PretrainResult", "run_pretrain"), "modula.trainers.pretrain"),
    **dict.fromkeys(("RunCost", "add_domain", "publish", "run_datasets", "run_stage", "train"),
                    "modula.trainers.runner"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modula.trainers' has no attribute {name!r}")
