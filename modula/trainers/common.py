"""What the pretraining loop and the adapter loop share: the learning-rate schedule, the AdamW
factory, one optimizer step over accumulated micro-batches in the stage's precision,
checksummed checkpoints, the metrics log, and the trainers' errors.

A step (:func:`accumulated_step`): ``grad_accum_steps`` micro-batches of
``batch_size // num_workers`` rows per worker, each forward under :func:`autocast`
(``precision``: ``fp32``, or bf16 / fp16 autocast over float32 master weights), each loss
weighted by its share of the step's label tokens, then one clipped AdamW step (fp16 through a
``GradScaler``, whose state goes into the checkpoint).

Checkpoints hold the trainable tensors, the optimiser state and the loop state as safetensors
and JSON with a checksum list, so a resume never unpickles anything and a corrupt checkpoint is
an error, not a fresh start.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
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
    "accumulated_step",
    "autocast",
    "batch_line",
    "grad_scaler",
    "load_checkpoint",
    "lr_at",
    "lr_multiplier",
    "make_optimizer",
    "make_scheduler",
    "label_tokens",
    "optimizer_step",
    "save_checkpoint",
    "to_device",
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


# ----------------------------------------------------------------------------------- one step

_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(precision: str, device: Any) -> contextlib.AbstractContextManager[Any]:
    """The forward's autocast: none for ``fp32``; bf16 / fp16 on the device's type. Matrix
    products run in the low precision, the parameters (the trained experts' float32 masters
    included) are cast per op and keep their own dtype."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype=getattr(torch, _AUTOCAST[precision]))


def grad_scaler(precision: str, device: Any, state: dict[str, Any] | None = None) -> Any:
    """fp16's loss scaler (None otherwise), restored from a checkpoint's ``state``."""
    import torch

    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(torch.device(device).type)
    if state:
        scaler.load_state_dict(state)
    return scaler


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A batch of tensors on the worker's device (``ray.train.torch.get_device()``)."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v
            for k, v in batch.items()}


def label_tokens(batch: dict[str, Any]) -> int:
    """The tokens a causal LM's loss averages over: labels after the first position, not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _micro_batches(model: Any, accum: int, world: int
                   ) -> Iterator[contextlib.AbstractContextManager[Any]]:
    """One context per micro-batch of a step: with DDP, gradients are all-reduced only in the
    last one (``no_sync`` before it)."""
    for i in range(accum):
        last = i == accum - 1
        yield contextlib.nullcontext() if last or world == 1 else model.no_sync()


def optimizer_step(optimizer: Any, params: list[Any], scaler: Any,
                   max_grad_norm: float | None = 1.0) -> float:
    """Clip the summed gradients and step (fp16: unscale first, skip a step whose gradients
    overflowed); returns the gradient norm before clipping."""
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm)


def accumulated_step(forward: Callable[[dict[str, Any], int], Any],
                     batches: list[list[dict[str, Any]]], optimizer: Any, params: list[Any], *,
                     precision: str = "fp32", scaler: Any = None, device: Any = "cpu",
                     model: Any = None, world: int = 1, max_grad_norm: float | None = 1.0
                     ) -> tuple[float, float]:
    """One optimizer step over ``batches[i][s]``, micro-batch ``i`` of data stream ``s``.

    ``forward(batch, s)`` returns the model's output for a batch already on ``device``. Each
    micro-batch's loss is weighted by its share of the stream's label tokens in the step, so a
    stream's loss (and gradient) is the one of all its micro-batches as one batch; the step's
    loss is the mean over the streams (a packed domain run: one stream per domain). Returns
    (loss, gradient norm before clipping).
    """
    streams = len(batches[0])
    counts = [[label_tokens(b) for b in micro] for micro in batches]
    totals = [sum(c[s] for c in counts) for s in range(streams)]
    optimizer.zero_grad(set_to_none=True)
    losses = [0.0] * streams
    for i, sync in enumerate(_micro_batches(model, len(batches), world)):
        with sync:
            for s, batch in enumerate(batches[i]):
                weight = counts[i][s] / totals[s] if totals[s] else 0.0
                with autocast(precision, device):
                    out = forward(to_device(batch, device), s)
                # a micro-batch without labels has a NaN mean: it weighs nothing
                loss = out.loss if counts[i][s] else out.loss.nan_to_num(0.0)
                scaled = loss * (weight / streams)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                losses[s] += float(loss.detach()) * weight
    norm = optimizer_step(optimizer, params, scaler, max_grad_norm)
    return sum(losses) / streams, norm


def batch_line(stage: StageConfig, max_length: int, streams: int = 1) -> str:
    """The run's batch as printed when it starts: the effective batch and how it is made."""
    sc = stage.scaling
    per = stage.per_worker_batch(streams) * streams
    return (f"effective batch {per * stage.grad_accum_steps * sc.num_workers} rows of "
            f"{max_length} tokens = {per} per worker x {stage.grad_accum_steps} accumulated x "
            f"{sc.num_workers} worker(s); precision {stage.precision}, gradient checkpointing "
            f"{'on' if stage.gradient_checkpointing else 'off'}")


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
