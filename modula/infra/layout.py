"""The map of storage: every key modula reads or writes under ``storage.root``, how models,
workspaces and sweeps are named, and the local folders it caches downloads in.

::

    data/<domain>/{train,validation,test,corpus}.parquet   the splits (modula data build)
    data/<domain>/manifest.json                           counts and fingerprint of a build
    tokenizers/builtin-<fingerprint>/                     the built-in tokenizer
    models/builtin-tiny/<fingerprint>/                    the pretrained built-in base model
    runs/pretrain/<run>/  runs/train/<run>/               Ray Train run folders (checkpoints)
    work/<model>/<variant>/<expert file>                  experts handed from stage to stage
    work/<model>/<variant>/costs/<run>.json               what each run cost
    registry/<model>/{blobs,versions,LATEST}              published versions (infra.registry)
    tune/<sweep>/  tune/_trials/<sweep>/<trial>/          Ray Tune experiments, trial records
    reports/eval/<variant>.json  reports/<file>           evaluation results, the report

A model's name is ``serve.model_name``; a baseline trained beside the configured variant is
published as ``<name>-<variant>``. Names follow the rules of :mod:`modula.config.names`,
re-exported here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from modula.config.names import (
    DOMAIN_NAME_RE,
    MODEL_NAME_RE,
    RESERVED_EXPERT_NAMES,
    SERVED_NAME_RE,
    expert_file,
)

__all__ = [
    "BUILTIN_MODELS",
    "DATA",
    "DOMAIN_NAME_RE",
    "EVAL_RESULTS",
    "MODEL_NAME_RE",
    "PRETRAIN_RUNS",
    "REGISTRY",
    "REPORTS",
    "RESERVED_EXPERT_NAMES",
    "SERVED_NAME_RE",
    "TOKENIZERS",
    "TRAIN_RUNS",
    "TUNE",
    "TUNE_TRIALS",
    "WORK",
    "builtin_model_key",
    "cache_dir",
    "data_manifest_key",
    "expert_file",
    "model_name",
    "published_name",
    "registry_model_name",
    "scratch_dir",
    "split_key",
    "sweep_name",
    "sweep_workspace",
    "tokenizer_key",
    "workspace_key",
]

DATA = "data"
TOKENIZERS = "tokenizers"
BUILTIN_MODELS = "models/builtin-tiny"
PRETRAIN_RUNS = "runs/pretrain"
TRAIN_RUNS = "runs/train"
WORK = "work"
REGISTRY = "registry"
TUNE = "tune"
TUNE_TRIALS = f"{TUNE}/_trials"
REPORTS = "reports"
EVAL_RESULTS = f"{REPORTS}/eval"


# ----------------------------------------------------------------------------------- keys


def split_key(domain: str, split: str) -> str:
    """Where a domain's split (or its pretraining ``corpus``) lives."""
    return f"{DATA}/{domain}/{split}.parquet"


def data_manifest_key(domain: str) -> str:
    return f"{DATA}/{domain}/manifest.json"


def tokenizer_key(fingerprint: str) -> str:
    return f"{TOKENIZERS}/builtin-{fingerprint[:16]}"


def builtin_model_key(fingerprint: str) -> str:
    return f"{BUILTIN_MODELS}/{fingerprint[:16]}"


# ----------------------------------------------------------------------------------- names


def model_name(cfg: Any) -> str:
    """The registry name of the model a config trains."""
    return cfg.serve.model_name


def published_name(cfg: Any, variant: str | None = None, name: str | None = None) -> str:
    """The registry name a config's model is published under: ``serve.model_name`` (or
    `name`) for the configured variant, ``<name>-<variant>`` for another one (the baselines)."""
    base = name or model_name(cfg)
    variant = variant or cfg.modula.variant
    return base if variant == cfg.modula.variant else f"{base}-{variant}"


def registry_model_name(cfg: Any) -> str:
    """The registry model a service serves: ``serve.registry_model``, else ``serve.model_name``."""
    return cfg.serve.registry_model or cfg.serve.model_name


def workspace_key(cfg: Any, name: str | None = None, variant: str | None = None) -> str:
    """Where the stages leave expert files for the next stage (and ``publish`` collects them)."""
    return f"{WORK}/{name or model_name(cfg)}/{variant or cfg.modula.variant}"


def sweep_name(cfg: Any, stage: str, name: str | None = None) -> str:
    """A sweep's stable experiment name: ``tune.name``, or ``<model>-<variant>-<stage>``."""
    if cfg.tune.name:
        return cfg.tune.name
    variant = stage if stage in ("lora", "molora") else cfg.modula.variant
    return f"{name or model_name(cfg)}-{variant}-{stage.replace(':', '-')}"


def sweep_workspace(sweep: str, trial_id: str) -> str:
    """The model name whose workspace a sweep's trial writes its experts to (never the
    model's own)."""
    return f"tune-{sweep}-{trial_id}"


# ----------------------------------------------------------------------------------- local


def cache_dir(kind: str, *parts: str) -> Path:
    """A folder under the system temporary directory that outlives a process
    (``modula-<kind>/<parts>``): downloads kept for the next process that needs them."""
    return Path(tempfile.gettempdir(), f"modula-{kind}", *parts)


def scratch_dir(kind: str) -> Path:
    """A new private temporary folder (``modula-<kind>-XXXX``); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=f"modula-{kind}-"))
