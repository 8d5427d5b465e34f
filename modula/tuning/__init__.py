"""Ray Tune sweeps over any stage: search spaces from the config, ASHA early stopping, resumable sweeps, the best trial written back as a config."""
