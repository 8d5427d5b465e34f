"""The worker loop of every adapter stage (``train_loop_per_worker`` of the stage's TorchTrainer).

One loop serves all stages; a :class:`~modula.trainers.plan.StageRun` says what differs: which
experts train (``set_stage``), which experts are loaded first, which data streams feed it.
The model and its batches live on the worker's device (``ray.train.torch.get_device``: its GPU
with ``scaling.gpus_per_worker > 0``). The schedule, optimiser, one accumulated step in the
stage's precision and checkpoints are :mod:`modula.trainers.common`'s.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from modula.basemodel import load_base_model
from modula.config.schema import ModulaConfig
from modula.data.encode import ROUTE_TARGETS
from modula.infra.layout import expert_file
from modula.infra.storage import Storage
from modula.model import attach_modula, load_expert, save_expert
from modula.trainers.classifier import CLASSIFY_KEY, fit_classifier
from modula.trainers.common import (
    EXPERTS_DIR,
    accumulated_step,
    autocast,
    grad_scaler,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
    to_device,
)
from modula.trainers.plan import CLASSIFIER, StageRun

__all__ = ["adapter_loop", "build_stage_model", "fetch_inputs", "worker_node"]


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
                     batch_size: int, max_batches: int = 4, **run: Any) -> float | None:
    """Mean response loss on the validation shards (the metric a sweep ranks trials by)."""
    sums = _validation_sums(model, shards, pinned, batch_size, max_batches, **run)
    total, count = sum(s for s, _ in sums.values()), sum(c for _, c in sums.values())
    return total / count if count else None


def _validation_sums(model: Any, shards: dict[str, Any], pinned: dict[str, int | None],
                     batch_size: int, max_batches: int = 4, *, device: Any = "cpu",
                     precision: str = "fp32") -> dict[str, tuple[float, int]]:
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
                kw = _model_inputs(to_device(batch, device), pinned.get(key))
                with autocast(precision, device):
                    out_ = model(**kw, use_cache=False)
                total += float(out_.loss)
                count += 1
            out[key] = (total, count)
    model.train()
    return out


def _validation_metrics(model: Any, shards: dict[str, Any], pinned: dict[str, int | None],
                        batch_size: int, per_domain: dict[str, Any], world: int,
                        **run: Any) -> dict[str, float]:
    """``val_loss_<domain>`` for each per-domain shard and ``val_loss``, their average (the
    paper's checkpoint selection rule); without per-domain shards ``val_loss`` is the mean over
    ``shards``. Batch losses are summed over the workers."""
    import torch
    import torch.distributed as dist

    shards = {**shards, **{f"val_{d}": s for d, s in per_domain.items()}}
    sums = _validation_sums(model, shards, pinned, batch_size, **run)
    keys = list(sums)
    if world > 1 and dist.is_initialized():
        t = torch.tensor([x for k in keys for x in sums[k]], dtype=torch.float64,
                         device=run.get("device", "cpu"))
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


def fetch_inputs(cfg: ModulaConfig, run: StageRun, inputs_key: str | None,
                 cache: Path) -> dict[str, Path]:
    """The earlier stages' expert files this run loads, as files on this worker's node: read in
    place from a local storage root (one machine, or a file system every node mounts),
    downloaded into `cache` from S3. Each worker fetches them itself, so it does not matter
    which node it runs on. A missing expert is left out (:func:`build_stage_model` names it)."""
    if not run.inputs or inputs_key is None:
        return {}
    storage = Storage(cfg.storage)
    out: dict[str, Path] = {}
    for name in run.inputs:
        key = f"{inputs_key}/{expert_file(name)}"
        if not storage.is_s3:
            path = Path(storage.uri(key))
            if path.is_file():
                out[name] = path
            continue
        try:
            out[name] = storage.download_file(key, cache / expert_file(name))
        except FileNotFoundError:
            continue
    return out


def build_stage_model(cfg: ModulaConfig, run: StageRun, inputs: dict[str, Path],
                      where: str = "the workspace") -> Any:
    """The base model with MoDULA attached as the run needs it, earlier experts loaded from
    `inputs` (:func:`fetch_inputs`), and exactly the run's parameters trainable. The experts
    are float32 whatever ``model.dtype`` is: the master weights the optimizer updates
    (``precision`` only autocasts the forward)."""
    import torch

    base, _ = load_base_model(cfg)
    layer_cfg = cfg.modula.model_copy(update={"variant": run.variant})
    model = attach_modula(base, layer_cfg, domains=list(run.domains),
                          adapter_dtype=torch.float32)
    for name in run.inputs:
        if name not in inputs:
            raise FileNotFoundError(
                f"run {run.name}: expert {name!r} from an earlier stage is missing "
                f"({where} has no {expert_file(name)}); train that stage first")
        load_expert(model, name, inputs[name])
    if run.model_stage is not None:
        model.set_stage(run.model_stage)
    else:  # a packed domain run: each listed expert trains, each on its own pinned rows
        model.set_stage(None)
        for name in run.trains:
            for p in model.expert_parameters(name):
                p.requires_grad_(True)
    return model


def worker_node() -> dict[str, str]:
    """Where this process runs: the Ray node id and the node's IP address."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}


def _gather_nodes(world: int) -> list[dict[str, Any]]:
    """Every rank's :func:`worker_node`, in rank order (an all-gather: every rank calls it)."""
    import torch.distributed as dist

    me = worker_node()
    if world > 1 and dist.is_initialized():
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    return [{"rank": r, **n} for r, n in enumerate(everyone)]


def _validation_shards(config: dict[str, Any], run: StageRun, pins: dict[str, int | None]
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, int | None]]:
    """Validation (sweeps): one mixed shard, or one shard per domain (pinned to its expert in a
    packed run) whose losses are averaged. Returns (mixed shards, per-domain shards, pins)."""
    import ray.train

    val_shards, val_per_domain, val_pins = {}, {}, dict(pins)
    if config.get("validate"):
        if run.pinned:
            for s in run.pinned:
                val_per_domain[s] = ray.train.get_dataset_shard(f"val_{s}")
                val_pins[f"val_{s}"] = pins[s]
        else:
            for d in config.get("val_domains") or ():
                val_per_domain[d] = ray.train.get_dataset_shard(f"val_{d}")
            if not val_per_domain:
                val_shards["train"] = ray.train.get_dataset_shard("val")
    return val_shards, val_per_domain, val_pins


def route_supervision_loss(gates: list[Any], targets: Any) -> Any:
    """Router supervision [ours]: the mean over layers of the cross-entropy between each
    token's gates and the gate column of its example's domain (targets -100 are skipped)."""
    import torch
    import torch.nn.functional as F

    if not gates:
        raise ValueError("no router gates were collected: is the routed path running?")
    targets = targets.to(gates[0].device)
    if not bool((targets != -100).any()):
        return gates[0].sum() * 0.0
    losses = [F.nll_loss(torch.log(g.float().clamp_min(1e-9)).reshape(-1, g.shape[-1]),
                         targets.reshape(-1), ignore_index=-100) for g in gates]
    return torch.stack(losses).mean()


def _report(metrics: dict[str, Any], model: Any, optimizer: Any, state: dict[str, Any],
            run: StageRun, rank: int, last: bool) -> None:
    """A checkpoint from rank 0 (the last one also holds the trained experts and the run's
    cost), ``checkpoint=None`` elsewhere: ``report`` is a barrier every rank calls."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="modula-ckpt-") as d:
        save_checkpoint(Path(d), model, optimizer, state)
        if last:
            for name in run.trains:
                save_expert(model, name, Path(d) / EXPERTS_DIR / expert_file(name))
            (Path(d) / "cost.json").write_text(json.dumps({
                "trainable_parameters": state["trainable_parameters"], "tokens": state["tokens"],
                "loop_seconds": state["loop_seconds"], "world_size": state["world_size"],
                "steps": state["step"], "final_loss": state["loss"], "resumed": state["resumed"],
                "effective_batch": state["effective_batch"],
                **({"classifier_accuracy": state["classifier_accuracy"]}
                   if "classifier_accuracy" in state else {}),
                "nodes": state["nodes"], "node_history": state["node_history"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def adapter_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: train the run's experts, checkpoint, resume, report."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    cfg: ModulaConfig = config["cfg"]
    run: StageRun = config["run"]
    stage = cfg.stages.get(run.section)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(stage.scaling.cpus_per_worker)))
    torch.manual_seed(stage.seed)
    device = get_device()  # the worker's GPU with use_gpu, else the CPU

    inputs_key = config.get("inputs_key")
    with tempfile.TemporaryDirectory(prefix="modula-inputs-") as cache:
        inputs = fetch_inputs(cfg, run, inputs_key, Path(cache))
        model = build_stage_model(cfg, run, inputs, where=Storage(cfg.storage).uri(
            inputs_key or "")).to(device)
    model.train()
    if stage.gradient_checkpointing:
        model.enable_activation_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    ddp = prepare_model(model, move_to_device=False,
                        parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    optimizer = make_optimizer(model, stage.lr, stage.weight_decay, decay_all=True)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "loop_seconds": 0.0, "resumed": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer)
        state["resumed"] = int(state.get("resumed", 0)) + 1
    scaler = grad_scaler(stage.precision, device, state.get("scaler"))
    # where this attempt's workers run; a resumed run keeps the earlier attempts' nodes
    nodes = _gather_nodes(world)
    state["nodes"] = nodes
    state["node_history"] = [*state.get("node_history", []), [n["node_id"] for n in nodes]]

    streams = list(run.pinned) or ["train"]
    pins = {s: (run.domains.index(s) if run.pinned else None) for s in streams}
    per_worker, accum = stage.per_worker_batch(len(streams)), stage.grad_accum_steps
    iters = {s: _cycle(ray.train.get_dataset_shard(f"train_{s}" if run.pinned else "train"),
                       per_worker, stage.seed * 7919 + rank * 101 + state["step"])
             for s in streams}
    val_shards, val_per_domain, val_pins = _validation_shards(config, run, pins)
    supervise = run.stage == "router" and stage.route_supervision > 0
    board = config.get("board")
    pad_id = int(config.get("pad_id", 0))

    def forward(batch: dict[str, Any], s: int) -> Any:
        if not supervise:
            return ddp(**_model_inputs(batch, pins[streams[s]]), use_cache=False)
        with model.collect_router_gates() as gates:
            out = ddp(**_model_inputs(batch, pins[streams[s]]), use_cache=False)
        # the step minimises (and logs) the language-model loss plus the routing term
        out.loss = out.loss + stage.route_supervision * route_supervision_loss(
            gates, batch[ROUTE_TARGETS])
        return out

    t_start = time.time()
    seconds_before = float(state["loop_seconds"])
    tokens_since, t_last = 0, time.time()
    step = int(state["step"])
    loss_val = float("nan")
    while step < stage.steps:
        lr = lr_at(step, stage.steps, stage.warmup_steps, stage.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batches = [[next(iters[s]) for s in streams] for _ in range(accum)]
        loss_val, _ = accumulated_step(forward, batches, optimizer, trainable,
                                       precision=stage.precision, scaler=scaler, device=device,
                                       model=ddp, world=world)
        tokens_since += sum(int((b["input_ids"] != pad_id).sum()) for m in batches for b in m)
        step += 1
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
                         loss=loss_val, trainable_parameters=n_trainable, world_size=world,
                         effective_batch=per_worker * len(streams) * accum * world,
                         scaler=scaler.state_dict() if scaler is not None else None)
            metrics = {"step": step, "loss": loss_val, "tokens": state["tokens"],
                       "loop_seconds": state["loop_seconds"]}
            if val_shards or val_per_domain:
                metrics.update(_validation_metrics(model, val_shards, val_pins, per_worker,
                                                   val_per_domain, world, device=device,
                                                   precision=stage.precision))
            if last and CLASSIFIER in run.trains:
                fit = fit_classifier(model, ray.train.get_dataset_shard(CLASSIFY_KEY), stage,
                                     world)
                state["classifier_accuracy"] = fit["accuracy"]
                state["trainable_parameters"] += sum(
                    p.numel() for p in model.request_router.head.parameters())
            if "classifier_accuracy" in state:
                metrics["classifier_accuracy"] = state["classifier_accuracy"]
            _report(metrics, model, optimizer, state, run, rank, last)
    if dist.is_initialized():
        dist.barrier()
