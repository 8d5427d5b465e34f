"""Stage 0: pretraining the built-in tiny base model with Ray Train (``modula pretrain``).

Data: the ``general`` and ``code`` training records in the chat format (every token a label, so
the model learns the format and eos) plus their pretraining corpora (documentation prose and whole
standard-library modules, held-out groups excluded), tokenised and packed by Ray Data from the
parquet in storage. Training: a ``TorchTrainer`` (Train V2) with checkpoints every
``checkpoint_every`` steps and ``FailureConfig``; a stopped or failed run resumes from its last
checkpoint (the run name is the model's fingerprint). The result is saved with ``save_pretrained``
(with its tokenizer) under ``models/builtin-tiny/<fingerprint>/`` and reused while the config and
data are unchanged. The schedule, optimiser, checkpoints and metrics log are
:mod:`modula.trainers.common`'s; live progress on the driver is :mod:`modula.trainers.progress`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from modula.basemodel import (
    MARKER,
    build_model,
    builtin_fingerprint,
    builtin_info,
    builtin_key,
    count_parameters,
)
from modula.config.schema import ModulaConfig
from modula.data.build import ensure_data, ensure_tokenizer
from modula.data.encode import tokenized_dataset, tokenizer_files, tokenizer_from_files
from modula.data.io import read_dataset, read_records
from modula.data.tokenizer import load_tokenizer
from modula.eval.evaluate import response_nll
from modula.eval.metrics import perplexity
from modula.infra.connect import connect
from modula.infra.layout import PRETRAIN_RUNS
from modula.infra.storage import Storage
from modula.model import enable_activation_checkpointing
from modula.trainers.common import (
    STATE_FILE,
    MetricsLog,
    PlanError,
    StageError,
    accumulated_step,
    batch_line,
    grad_scaler,
    label_tokens,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
)
from modula.trainers.progress import ProgressBoard, fit_with_progress

__all__ = [
    "PretrainResult",
    "checkpoint_metrics",
    "heldout_perplexity",
    "load_pretrain_checkpoint",
    "pretrain_datasets",
    "pretrain_loop",
    "run_pretrain",
    "save_pretrain_checkpoint",
    "train_step",
]

_HELDOUT_DOMAINS = ("general", "code")


# --------------------------------------------------------------------------------------------
# one step, one checkpoint


def train_step(model: Any, batch: dict[str, Any] | list[dict[str, Any]], optimizer: Any,
               scheduler: Any | None = None, max_grad_norm: float | None = 1.0, *,
               precision: str = "fp32", scaler: Any = None, device: Any = "cpu",
               world: int = 1) -> dict[str, float]:
    """One optimiser step on a packed batch (``input_ids``, ``labels``, ``position_ids``), or on
    a list of micro-batches accumulated into one step
    (:func:`~modula.trainers.common.accumulated_step`).

    No attention mask and ``use_cache=False``: the restarting position ids keep packed examples
    apart (see :mod:`modula.data.encode`). Returns loss, label tokens, lr and gradient norm.
    """
    micro = batch if isinstance(batch, list) else [batch]
    model.train()

    def forward(b: dict[str, Any], _: int) -> Any:
        kwargs = {k: b[k] for k in ("input_ids", "labels", "position_ids") if k in b}
        return model(**kwargs, use_cache=False)

    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss, gnorm = accumulated_step(forward, [[b] for b in micro], optimizer, params,
                                   precision=precision, scaler=scaler, device=device,
                                   model=model, world=world, max_grad_norm=max_grad_norm)
    if scheduler is not None:
        scheduler.step()
    return {
        "loss": loss,
        "tokens": sum(label_tokens(b) for b in micro),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "grad_norm": gnorm,
    }


def save_pretrain_checkpoint(path: str | Path, model: Any, optimizer: Any, scheduler: Any,
                             step: int, log: MetricsLog, extra: dict[str, Any] | None = None
                             ) -> Path:
    """Weights, AdamW and scheduler state, the step and the metrics log
    (:func:`~modula.trainers.common.save_checkpoint`: checksummed, nothing pickled)."""
    p = Path(path)
    raw = model.module if hasattr(model, "module") else model
    state = {"step": step, "metrics": log.rows, **(extra or {}),
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_checkpoint(p, raw, optimizer, state)
    return p


def load_pretrain_checkpoint(path: str | Path, model: Any, optimizer: Any, scheduler: Any
                             ) -> tuple[int, MetricsLog]:
    """Restore what :func:`save_pretrain_checkpoint` wrote (checksums verified); returns
    (step, log)."""
    raw = model.module if hasattr(model, "module") else model
    state = load_checkpoint(Path(path), raw, optimizer)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), MetricsLog(state.get("metrics"))


def checkpoint_metrics(path: str | Path) -> MetricsLog:
    """The metrics log inside a checkpoint folder."""
    return MetricsLog(json.loads((Path(path) / STATE_FILE).read_text()).get("metrics"))


# --------------------------------------------------------------------------------------------
# the worker loop


def _batches(shard: Any, size: int, seed: int, rank: int) -> Any:
    """Endless shuffled batches of the worker's shard, a new order each epoch."""
    epoch = 0
    while True:
        yield from shard.iter_torch_batches(batch_size=size, drop_last=True,
                                            local_shuffle_buffer_size=size * 16,
                                            local_shuffle_seed=seed * 1000 + epoch * 10 + rank)
        epoch += 1


def pretrain_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the pretraining ``TorchTrainer``."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    cfg: ModulaConfig = config["cfg"]
    stage = cfg.stages.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(stage.scaling.cpus_per_worker)))
    torch.manual_seed(stage.seed + rank)
    device = get_device()  # the worker's GPU with use_gpu, else the CPU

    tok = tokenizer_from_files(config["tokenizer_files"])
    model = build_model(cfg.model.tiny, tok).to(device)
    if stage.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = prepare_model(model, move_to_device=False) if world > 1 else model
    optimizer = make_optimizer(model, stage.lr, stage.weight_decay)
    scheduler = make_scheduler(optimizer, stage)
    step, log, scaler_state = 0, MetricsLog(), None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step, log = load_pretrain_checkpoint(d, model, optimizer, scheduler)
            scaler_state = json.loads((Path(d) / STATE_FILE).read_text()).get("scaler")
        log.log(step=step, event="resumed")
    scaler = grad_scaler(stage.precision, device, scaler_state)
    board = config.get("board")
    batches = _batches(ray.train.get_dataset_shard("train"), stage.per_worker_batch(),
                       stage.seed, rank)
    tokens = int(log.last("tokens") or 0)
    t_last, tok_last = time.time(), tokens
    if step >= stage.steps:  # resumed from the last checkpoint of a finished run: hand it back
        _report(step, {"loss": log.last("loss") or float("nan"), "lr": 0.0}, model, optimizer,
                scheduler, log, tok, rank, final=True, scaler=scaler)
        return
    while step < stage.steps:
        micro = [next(batches) for _ in range(stage.grad_accum_steps)]
        m = train_step(model, micro, optimizer, scheduler, precision=stage.precision,
                       scaler=scaler, device=device, world=world)
        step += 1
        tokens += m["tokens"] * world
        now = time.time()
        if rank == 0 and (now - t_last > 1.0 or step == stage.steps):
            rate = (tokens - tok_last) / max(now - t_last, 1e-6)
            log.log(step=step, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
                    tokens=tokens, tokens_per_s=round(rate, 1))
            if board is not None:
                board.push(step=step, loss=m["loss"], lr=m["lr"], tokens_per_s=rate)
            t_last, tok_last = now, tokens
        if step % stage.checkpoint_every == 0 or step >= stage.steps:
            _report(step, m, model, optimizer, scheduler, log, tok, rank,
                    final=step >= stage.steps, scaler=scaler)


def _report(step: int, m: dict[str, float], model: Any, optimizer: Any, scheduler: Any,
            log: MetricsLog, tok: Any, rank: int, final: bool, scaler: Any = None) -> None:
    """A checkpoint from rank 0, ``checkpoint=None`` elsewhere: ``report`` is a barrier, so every
    rank calls it the same number of times. The final one also holds the HF model folder."""
    import ray.train

    metrics = {"step": step, "loss": m["loss"], "lr": m["lr"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="modula-ckpt-") as d:
        save_pretrain_checkpoint(d, model, optimizer, scheduler, step, log,
                                 {"scaler": scaler.state_dict()} if scaler is not None else None)
        if final:
            raw = model.module if hasattr(model, "module") else model
            raw.save_pretrained(Path(d) / "hf")
            tok.save_pretrained(Path(d) / "hf")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# --------------------------------------------------------------------------------------------
# the driver


@dataclass
class PretrainResult:
    key: str  # where the model folder is in storage
    fingerprint: str
    parameters: int
    cached: bool
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    data_seconds: float = 0.0
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    final_loss: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_perplexity(model: Any, tokenizer: Any, storage: Storage, max_length: int,
                       limit: int = 100, split: str = "validation") -> dict[str, float]:
    """Response perplexity on held-out general and code records (the stage-0 yardstick)."""
    out = {}
    for d in _HELDOUT_DOMAINS:
        nll, n = response_nll(model, tokenizer, read_records(storage, d, split, limit), max_length)
        out[d] = round(perplexity(nll, n), 3)
    return out


def pretrain_datasets(cfg: ModulaConfig, storage: Storage, tokenizer_dir: str | Path) -> Any:
    """The packed training rows (Ray Data, materialised): chat-format general/code records with
    every token a label, plus the general/code corpora."""
    import ray.data

    # the driver shows its own progress; Ray Data's bars would interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False
    max_len = cfg.stages.pretrain.max_length or cfg.model.max_length
    records = tokenized_dataset(read_dataset(storage, list(_HELDOUT_DOMAINS), "train"),
                                tokenizer_dir, max_len, train_on_prompt=True)
    corpus = tokenized_dataset(read_dataset(storage, list(_HELDOUT_DOMAINS), "corpus"),
                               tokenizer_dir, max_len, batch_size=8)
    return records.union(corpus).random_shuffle(seed=cfg.stages.pretrain.seed).materialize()


def run_pretrain(cfg: ModulaConfig, storage: Storage | None = None, force: bool = False,
                 console: Any | None = None, show_progress: bool = True) -> PretrainResult:
    """Build (or reuse) the built-in base model for this config; returns what was measured."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if not cfg.model.is_builtin:
        raise PlanError(f"model.base is {cfg.model.base!r}: only the built-in model "
                         "(builtin:tiny) is pretrained here")
    console = console or Console()
    storage = storage or Storage(cfg.storage)
    t_start = time.time()
    fp = builtin_fingerprint(cfg)
    key = builtin_key(cfg)
    info = builtin_info(cfg, storage)
    if info and not force:
        return PretrainResult(**{**info, "cached": True})

    t0 = time.time()
    ensure_data(cfg, storage, list(_HELDOUT_DOMAINS))
    tok_key = ensure_tokenizer(cfg, storage)
    data_seconds = time.time() - t0
    stage = cfg.stages.pretrain
    max_len = stage.max_length or cfg.model.max_length

    with tempfile.TemporaryDirectory(prefix="modula-pretrain-") as tmp:
        tok_dir = storage.local_dir(tok_key, Path(tmp) / "tokenizer")
        tok = load_tokenizer(tok_dir)
        init = build_model(cfg.model.tiny, tok)
        params = count_parameters(init)
        console.print(f"built-in model: {params / 1e6:.2f}M parameters, fingerprint {fp[:16]}")
        before = heldout_perplexity(init, tok, storage, max_len)
        console.print(f"held-out response perplexity before training: {before}")
        del init

        connect(cfg.cluster)
        t0 = time.time()
        train_ds = pretrain_datasets(cfg, storage, tok_dir)
        rows = train_ds.count()
        data_seconds += time.time() - t0
        console.print(f"training rows: {rows} packed sequences of {max_len} tokens "
                      f"({rows * max_len / 1e6:.2f}M token slots); {stage.steps} steps x "
                      f"{stage.effective_batch} = "
                      f"{stage.steps * stage.effective_batch / max(rows, 1):.2f} epochs")
        console.print("pretraining: " + batch_line(stage, max_len))

        # a stable name: a stopped run resumes from its last checkpoint; --force starts afresh
        run_name = f"pretrain-{fp[:16]}" + (time.strftime("-%Y%m%d-%H%M%S") if force else "")
        storage_path, fs = storage.ray_storage(PRETRAIN_RUNS)
        board = ProgressBoard(f"modula-progress-{run_name}-{os.getpid()}").create()
        trainer = TorchTrainer(
            pretrain_loop,
            train_loop_config={"cfg": cfg, "tokenizer_files": tokenizer_files(tok_dir), "board": board},
            scaling_config=ray.train.ScalingConfig(
                num_workers=stage.scaling.num_workers,
                use_gpu=stage.scaling.use_gpu,
                resources_per_worker={"CPU": stage.scaling.cpus_per_worker,
                                      **({"GPU": stage.scaling.gpus_per_worker} if stage.scaling.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=storage_path,
                storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=stage.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": train_ds},
        )
        t0 = time.time()
        try:
            result = fit_with_progress(trainer.fit, board, stage.steps, "pretraining", console,
                                       show=show_progress)
        finally:
            board.close()
        train_seconds = time.time() - t0
        if result.error is not None:
            raise StageError(f"pretraining failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise StageError("pretraining finished without a checkpoint")

        with result.checkpoint.as_directory() as d:
            hf_dir = Path(tmp) / "hf"
            shutil.copytree(Path(d) / "hf", hf_dir)
            log = checkpoint_metrics(d)
        log.save(storage, f"{PRETRAIN_RUNS}/{run_name}/metrics.jsonl")

        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
        after = heldout_perplexity(trained, tok, storage, max_len)
        console.print(f"held-out response perplexity after training: {after}")
        res = PretrainResult(
            key=key, fingerprint=fp, parameters=params, cached=False, steps=stage.steps,
            tokens=int(log.last("tokens") or 0), train_seconds=round(train_seconds, 1),
            total_seconds=round(time.time() - t_start, 1), data_seconds=round(data_seconds, 1),
            perplexity_before=before, perplexity_after=after, final_loss=log.last("loss"),
            config={"tiny": cfg.model.tiny.model_dump(mode="json"),
                    "pretrain": stage.model_dump(mode="json"), "max_length": max_len},
        )
        for p in sorted(hf_dir.iterdir()):
            storage.upload_file(p, f"{key}/{p.name}")
        # the marker last: its presence means the folder is complete
        storage.write_text(f"{key}/{MARKER}", json.dumps(res.to_dict(), indent=2))
    return res
