"""Ray Tune sweeps over any stage: search spaces from the config, ASHA early stopping, resumable
sweeps, the ranked trials and the best trial written back as a config."""

from modula.tuning.results import SweepError, SweepResult, TrialRow
from modula.tuning.space import apply_params, param_space, trial_config
from modula.tuning.sweep import run_sweep

__all__ = ["SweepError", "SweepResult", "TrialRow", "apply_params", "param_space", "run_sweep",
           "trial_config"]
