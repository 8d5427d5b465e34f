"""Ray Train stage runners.

- :mod:`modula.trainers.pretrain`: stage 0, the built-in tiny base model (``modula pretrain``);
  also the reusable loop pieces: ``lr_multiplier`` / ``make_scheduler`` (warmup + cosine),
  ``make_optimizer``, ``train_step`` (a packed batch), ``MetricsLog``, ``save_checkpoint`` /
  ``load_checkpoint``.
- :mod:`modula.trainers.progress`: live progress of Ray Train runs on the driver.
"""

from modula.trainers.pretrain import (
    MetricsLog,
    PretrainResult,
    load_checkpoint,
    lr_multiplier,
    make_optimizer,
    make_scheduler,
    run_pretrain,
    save_checkpoint,
    train_step,
)

__all__ = [
    "MetricsLog",
    "PretrainResult",
    "load_checkpoint",
    "lr_multiplier",
    "make_optimizer",
    "make_scheduler",
    "run_pretrain",
    "save_checkpoint",
    "train_step",
]
