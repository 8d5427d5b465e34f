"""What a sweep produces: its trials as rows and the sweep's result, shared by the sweep
(:mod:`modula.tuning.sweep`) and its report (:mod:`modula.tuning.report`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modula.config.schema import ModulaConfig
from modula.errors import ModulaError

__all__ = ["SweepError", "SweepResult", "TrialRow"]


class SweepError(ModulaError, RuntimeError):
    """A sweep that cannot start or finish; the message says what to do."""


@dataclass
class TrialRow:
    """One trial as the results table shows it."""

    trial_id: str
    status: str  # finished | stopped early | error | incomplete
    params: dict[str, Any]
    metric: float | None
    steps_done: int
    steps: int
    reports: int
    starts: int = 1
    wall_seconds: float | None = None
    trainable_parameters: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    run_name: str | None = None
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SweepResult:
    """A finished sweep: its trials ranked best first, the best one, the files written."""

    name: str
    stage: str
    metric: str
    mode: str
    path: str
    trials: list[TrialRow]
    best: TrialRow | None
    best_config: ModulaConfig | None
    files: dict[str, Path] = field(default_factory=dict)
    resumed: bool = False

    @property
    def stopped_early(self) -> list[TrialRow]:
        return [t for t in self.trials if t.status == "stopped early"]
