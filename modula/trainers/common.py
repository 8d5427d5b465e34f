"""What the pretraining loop and the adapter loop share: the learning-rate schedule, the AdamW
factory, checksummed checkpoints, the metrics log, and the trainers' errors.

Checkpoints hold the trainable tensors, the optimiser state and the loop state as safetensors
and JSON with a checksum list, so a resume never unpickles anything and a corrupt checkpoint is
an error, not a fresh start.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from modula.config.schema import StageConfig
from modula.errors import ModulaError
from modula.infra.files import sha256_file
from modula.infra.storage import Storage

__all__ = [
    "EXPERTS_DIR",
    "STATE_FILE",
    "CheckpointError",
    "MetricsLog",
    "PlanError",
    "StageError",
    "load_checkpoint",
    "lr_at",
    "lr_multiplier",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
]

STATE_FILE = "state.json"
PARAMS_FILE = "trainable.safetensors"
OPTIM_FILE = "optimizer.safetensors"
SUMS_FILE = "checksums.json"
# the folder of a run's final checkpoint that holds the experts it trained
EXPERTS_DIR = "experts"


class StageError(ModulaError, RuntimeError):
    """A stage's run failed (after its retries), or its result cannot be used; the message
    names the run and the cause."""


class PlanError(ModulaError, ValueError):
    """A stage this config cannot train: the wrong variant, an unknown stage or domain."""


class CheckpointError(ModulaError, RuntimeError):
    """A checkpoint that exists but cannot be used (missing or corrupt files)."""


# ----------------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """:func:`lr_at` as a multiplier of the base learning rate (for ``LambdaLR``)."""
    return lr_at(step, total, warmup, 1.0, min_ratio)


def make_scheduler(optimizer: Any, stage: StageConfig) -> Any:
    """The stage's warmup + cosine schedule as a ``LambdaLR``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, stage.steps, stage.warmup_steps))


# ----------------------------------------------------------------------------------- optimiser


def make_optimizer(model: Any, lr: float, weight_decay: float = 0.0, *,
                   decay_all: bool = False) -> Any:
    """AdamW (betas 0.9 / 0.95) over the trainable parameters, in ``model.parameters()`` order.

    Pretraining exempts norms, biases and embeddings from weight decay (two groups); the
    adapter stages decay every trainable tensor (``decay_all``: one group).
    """
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        groups = [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    else:
        decay, no_decay = [], []
        for name, p in trainable:
            (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Trainable tensors, AdamW state and the loop state, each file's sha256 in checksums.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(directory / PARAMS_FILE))
    opt = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    save_file(tensors, str(directory / OPTIM_FILE))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
              for g in opt["param_groups"]]
    (directory / STATE_FILE).write_text(json.dumps({**state, "param_names": names,
                                                    "param_groups": groups}))
    sums = {f: sha256_file(directory / f) for f in (PARAMS_FILE, OPTIM_FILE, STATE_FILE)}
    (directory / SUMS_FILE).write_text(json.dumps(sums))


def load_checkpoint(directory: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore :func:`save_checkpoint`; raises CheckpointError on anything wrong."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = str(directory)
    sums_path = directory / SUMS_FILE
    if not sums_path.is_file():
        raise CheckpointError(f"checkpoint {where}: {SUMS_FILE} is missing (incomplete checkpoint)")
    try:
        sums = json.loads(sums_path.read_text())
    except ValueError:
        raise CheckpointError(f"checkpoint {where}: {SUMS_FILE} is not valid JSON") from None
    for f, digest in sums.items():
        p = directory / f
        if not p.is_file():
            raise CheckpointError(f"checkpoint {where}: {f} is missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint {where}: {f} is corrupt (sha256 mismatch)")
    state = json.loads((directory / STATE_FILE).read_text())
    try:
        saved = load_file(str(directory / PARAMS_FILE))
        opt_tensors = load_file(str(directory / OPTIM_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {where}: unreadable tensors ({exc})") from None
    params = dict(model.named_parameters())
    want = [n for n, p in params.items() if p.requires_grad]
    if want != state["param_names"]:
        raise CheckpointError(
            f"checkpoint {where}: it trains {len(state['param_names'])} tensors, this run "
            f"{len(want)}: the stage or model changed since it was written")
    with torch.no_grad():
        for n in want:
            if tuple(saved[n].shape) != tuple(params[n].shape):
                raise CheckpointError(f"checkpoint {where}: {n} has shape {tuple(saved[n].shape)}, "
                                      f"the model {tuple(params[n].shape)}")
            params[n].copy_(saved[n])
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


# ----------------------------------------------------------------------------------- metrics


class MetricsLog:
    """A run's own metrics log (Ray Train keeps metrics only with checkpoints): rows of dicts,
    written whole as JSON lines to storage on :meth:`save`."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows: list[dict[str, Any]] = list(rows or [])

    def log(self, **metrics: Any) -> None:
        self.rows.append({"time": round(time.time(), 3), **metrics})

    def to_jsonl(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.rows)

    @classmethod
    def from_jsonl(cls, text: str) -> MetricsLog:
        return cls([json.loads(line) for line in text.splitlines() if line.strip()])

    def save(self, storage: Storage, key: str) -> None:
        storage.write_text(key, self.to_jsonl())

    def last(self, key: str) -> Any:
        for r in reversed(self.rows):
            if key in r:
                return r[key]
        return None
