"""The worker loop of every adapter stage (``train_loop_per_worker`` of the stage's TorchTrainer).

One loop serves all stages; a :class:`~modula.trainers.plan.StageRun` says what differs: which
experts train (``set_stage``), which experts are loaded first, which data streams feed it.
Checkpoints hold only what trains plus the optimiser state, as safetensors with a checksum list,
so a resume never unpickles anything and a corrupt checkpoint is an error, not a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from modula.config import ModulaConfig
from modula.trainers.plan import StageRun

__all__ = ["CheckpointError", "adapter_loop", "save_adapter_checkpoint", "load_adapter_checkpoint",
           "lr_at"]

STATE_FILE = "state.json"
PARAMS_FILE = "trainable.safetensors"
OPTIM_FILE = "optimizer.safetensors"
SUMS_FILE = "checksums.json"
EXPERTS_DIR = "experts"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used (missing or corrupt files)."""


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_adapter_checkpoint(directory: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
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
    sums = {f: _sha256(directory / f) for f in (PARAMS_FILE, OPTIM_FILE, STATE_FILE)}
    (directory / SUMS_FILE).write_text(json.dumps(sums))


def load_adapter_checkpoint(directory: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore :func:`save_adapter_checkpoint`; raises CheckpointError on anything wrong."""
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
        if _sha256(p) != digest:
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


def _cycle(shard: Any, batch_size: int, seed: int) -> Any:
    """Endless packed batches from a Ray Data shard, reshuffled every epoch."""
    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=batch_size * 8,
                                              local_shuffle_seed=seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(
                f"a data shard produced no batch of {batch_size} rows: the domain has too little "
                "data for this batch size and worker count")
        epoch += 1


def _validation_loss(model: Any, shards: dict[str, Any], pinned: dict[str, int | None],
                     batch_size: int, max_batches: int = 4) -> float | None:
    """Mean response loss on the validation shards (the metric a sweep ranks trials by)."""
    sums = _validation_sums(model, shards, pinned, batch_size, max_batches)
    total, count = sum(s for s, _ in sums.values()), sum(c for _, c in sums.values())
    return total / count if count else None


def _validation_sums(model: Any, shards: dict[str, Any], pinned: dict[str, int | None],
                     batch_size: int, max_batches: int = 4) -> dict[str, tuple[float, int]]:
    """Per shard: the summed batch losses and the number of batches (at most ``max_batches``)."""
    import torch

    out: dict[str, tuple[float, int]] = {}
    model.eval()
    with torch.no_grad():
        for key, shard in shards.items():
            total, count = 0.0, 0
            for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size)):
                if i >= max_batches:
                    break
                kw = _model_inputs(batch, pinned.get(key))
                out_ = model(**kw, use_cache=False)
                total += float(out_.loss)
                count += 1
            out[key] = (total, count)
    model.train()
    return out


def _validation_metrics(model: Any, shards: dict[str, Any], pinned: dict[str, int | None],
                        batch_size: int, per_domain: dict[str, Any], world: int) -> dict[str, float]:
    """``val_loss_<domain>`` for each per-domain shard and ``val_loss``, their average (the
    paper's checkpoint selection rule); without per-domain shards ``val_loss`` is the mean over
    ``shards``. Batch losses are summed over the workers."""
    import torch
    import torch.distributed as dist

    shards = {**shards, **{f"val_{d}": s for d, s in per_domain.items()}}
    sums = _validation_sums(model, shards, pinned, batch_size)
    keys = list(sums)
    if world > 1 and dist.is_initialized():
        t = torch.tensor([x for k in keys for x in sums[k]], dtype=torch.float64)
        dist.all_reduce(t)
        sums = {k: (float(t[2 * i]), int(t[2 * i + 1])) for i, k in enumerate(keys)}
    metrics: dict[str, float] = {}
    domain_means = []
    for k in keys:
        total, count = sums[k]
        if not count:
            continue
        if k.startswith("val_"):
            metrics[f"val_loss_{k[4:]}"] = total / count
            domain_means.append(total / count)
    if per_domain and domain_means:
        metrics["val_loss"] = sum(domain_means) / len(domain_means)
    else:
        total = sum(sums[k][0] for k in keys if not k.startswith("val_"))
        count = sum(sums[k][1] for k in keys if not k.startswith("val_"))
        if count:
            metrics["val_loss"] = total / count
    return metrics


def _model_inputs(batch: dict[str, Any], pin: int | None) -> dict[str, Any]:
    import torch

    kw = {k: batch[k] for k in ("input_ids", "labels", "position_ids") if k in batch}
    if pin is not None:
        kw["expert_ids"] = torch.full((batch["input_ids"].shape[0],), pin, dtype=torch.long)
    return kw


def build_stage_model(cfg: ModulaConfig, run: StageRun, inputs_dir: Path | None) -> Any:
    """The base model with MoDULA attached as the run needs it, earlier experts loaded,
    and exactly the run's parameters trainable."""
    from modula.model import attach_modula, load_expert
    from modula.model.builtin import load_base_model

    base, _ = load_base_model(cfg)
    layer_cfg = cfg.modula.model_copy(update={"variant": run.variant})
    model = attach_modula(base, layer_cfg, domains=list(run.domains))
    for name in run.inputs:
        path = (inputs_dir / _expert_file(name)) if inputs_dir else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"run {run.name}: expert {name!r} from an earlier stage is missing "
                f"({path}); train that stage first")
        load_expert(model, name, path)
    if run.model_stage is not None:
        model.set_stage(run.model_stage)
    else:  # a packed domain run: each listed expert trains, each on its own pinned rows
        model.set_stage(None)
        for name in run.trains:
            for p in model.expert_parameters(name):
                p.requires_grad_(True)
    return model


def _expert_file(name: str) -> str:
    return f"{name}.safetensors" if name in ("universal", "routers") else f"domain-{name}.safetensors"


def adapter_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: train the run's experts, checkpoint, resume, report."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from modula.model import save_expert

    cfg: ModulaConfig = config["cfg"]
    run: StageRun = config["run"]
    stage = cfg.stages.get(run.section)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(stage.scaling.cpus_per_worker)))
    torch.manual_seed(stage.seed)

    inputs_dir = Path(config["inputs_dir"]) if config.get("inputs_dir") else None
    model = build_stage_model(cfg, run, inputs_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=(0.9, 0.95),
                                  weight_decay=stage.weight_decay)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "loop_seconds": 0.0, "resumed": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_adapter_checkpoint(Path(d), model, optimizer)
        state["resumed"] = int(state.get("resumed", 0)) + 1

    streams = list(run.pinned) or ["train"]
    pins = {s: (run.domains.index(s) if run.pinned else None) for s in streams}
    per_worker = max(1, stage.batch_size // world // len(streams))
    iters = {s: _cycle(ray.train.get_dataset_shard(f"train_{s}" if run.pinned else "train"),
                       per_worker, stage.seed * 7919 + rank * 101 + state["step"])
             for s in streams}
    # validation (sweeps): one mixed shard, or one shard per domain (pinned to its expert in a
    # packed run) whose losses are averaged
    val_shards, val_per_domain, val_pins = {}, {}, dict(pins)
    if config.get("validate"):
        if run.pinned:
            for s in streams:
                val_per_domain[s] = ray.train.get_dataset_shard(f"val_{s}")
                val_pins[f"val_{s}"] = pins[s]
        else:
            for d in config.get("val_domains") or ():
                val_per_domain[d] = ray.train.get_dataset_shard(f"val_{d}")
            if not val_per_domain:
                val_shards["train"] = ray.train.get_dataset_shard("val")
    board = config.get("board")
    pad_id = int(config.get("pad_id", 0))

    t_start = time.time()
    seconds_before = float(state["loop_seconds"])
    tokens_since, t_last = 0, time.time()
    step = int(state["step"])
    loss_val = float("nan")
    while step < stage.steps:
        lr = lr_at(step, stage.steps, stage.warmup_steps, stage.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for s in streams:
            batch = next(iters[s])
            out = ddp(**_model_inputs(batch, pins[s]), use_cache=False)
            (out.loss / len(streams)).backward()
            losses.append(float(out.loss.detach()))
            tokens_since += int((batch["input_ids"] != pad_id).sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        loss_val = sum(losses) / len(losses)
        now = time.time()
        if rank == 0 and board is not None and (now - t_last > 1.0 or step == stage.steps):
            board.push(step=step, loss=loss_val, lr=lr,
                       tokens_per_s=tokens_since * world / max(now - t_last, 1e-6))
            state["tokens"] = int(state["tokens"]) + tokens_since * world
            tokens_since, t_last = 0, now
        last = step >= stage.steps
        if step % stage.checkpoint_every == 0 or last:
            state["tokens"] = int(state["tokens"]) + tokens_since * world
            tokens_since = 0
            state.update(step=step, loop_seconds=seconds_before + time.time() - t_start,
                         loss=loss_val, trainable_parameters=n_trainable, world_size=world)
            metrics = {"step": step, "loss": loss_val, "tokens": state["tokens"],
                       "loop_seconds": state["loop_seconds"]}
            if val_shards or val_per_domain:
                metrics.update(_validation_metrics(model, val_shards, val_pins, per_worker,
                                                   val_per_domain, world))
            if rank != 0:
                ray.train.report(metrics, checkpoint=None)
                continue
            with tempfile.TemporaryDirectory(prefix="modula-ckpt-") as d:
                save_adapter_checkpoint(Path(d), model, optimizer, state)
                if last:
                    for name in run.trains:
                        save_expert(model, name, Path(d) / EXPERTS_DIR / _expert_file(name))
                    (Path(d) / "cost.json").write_text(json.dumps({
                        "trainable_parameters": n_trainable, "tokens": state["tokens"],
                        "loop_seconds": state["loop_seconds"], "world_size": world,
                        "steps": step, "final_loss": loss_val, "resumed": state["resumed"]}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    if dist.is_initialized():
        dist.barrier()
