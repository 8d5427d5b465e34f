"""Ray Tune sweeps over any stage: search spaces from the config, ASHA early stopping, resumable sweeps, the best trial written back as a config."""

from modula.tuning.space import apply_params, param_space, trial_config
from modula.tuning.sweep import SweepError, SweepResult, TrialRow, run_sweep, sweep_name

__all__ = ["run_sweep", "SweepResult", "SweepError", "TrialRow", "sweep_name", "apply_params",
           "param_space", "trial_config"]
