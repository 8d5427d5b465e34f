"""Driving the stages: Ray Train runs from the plan, expert files through the workspace, the
registry at the end, and the cost of every run.

The workspace (``work/<model>/<variant>/`` in storage) holds one file per expert as the stages
produce them; ``publish`` writes the complete experts directory (``save_experts``: files plus
``manifest.json``) and publishes it to the registry. ``add_domain`` starts from the registry's
latest version, trains only the new expert and the routers, and publishes on top of it, leaving
every other expert file byte-identical.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from modula.basemodel import check_base_model, load_base_model, resolve_base_dir
from modula.config.schema import DomainConfig, ModulaConfig
from modula.data.build import ensure_data
from modula.data.encode import tokenized_dataset
from modula.data.io import read_dataset
from modula.data.tokenizer import load_tokenizer
from modula.infra.connect import connect
from modula.infra.files import sha256_file
from modula.infra.layout import TRAIN_RUNS, expert_file, published_name, workspace_key
from modula.infra.registry import ExpertSpec, Registry, RegistryConflict
from modula.infra.storage import Storage
from modula.model import (
    attach_modula,
    import_peft,
    load_expert,
    load_modula,
    save_expert,
    save_experts,
)
from modula.trainers.classifier import CLASSIFY_KEY, classifier_dataset
from modula.trainers.common import EXPERTS_DIR, PlanError, StageError, batch_line
from modula.trainers.loop import adapter_loop
from modula.trainers.plan import CLASSIFIER, StageRun, plan_stage, stage_runs
from modula.trainers.progress import FitJob, ProgressBoard, fit_many_with_progress

__all__ = ["RunCost", "add_domain", "publish", "run_datasets", "run_stage", "train"]


@dataclass
class RunCost:
    """What one run cost: the basis of the paper's "pluggability" comparison."""

    run: str
    stage: str
    variant: str
    trains: list[str]
    trainable_parameters: int
    tokens: int
    steps: int
    num_workers: int
    wall_seconds: float
    loop_seconds: float
    worker_seconds: float
    final_loss: float | None
    resumed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    # rows behind one optimizer step: per-worker micro-batch x grad_accum_steps x workers
    effective_batch: int = 0
    # where the workers ran: the last attempt's, one entry per rank ({rank, node_id, ip}), and
    # the node ids of every attempt (a run resumed after losing a node has two or more)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    node_history: list[list[str]] = field(default_factory=list)

    @property
    def node_ips(self) -> list[str]:
        """The distinct IP addresses of the last attempt's workers, in rank order."""
        return list(dict.fromkeys(n["ip"] for n in self.nodes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ data


def _run_datasets(cfg: ModulaConfig, run: StageRun, storage: Storage, tok_dir: Path,
                  validate: bool) -> dict[str, Any]:
    """The Ray Data inputs of a run: ``train`` (or ``train_<domain>`` per pinned stream) and,
    for sweeps, ``val`` / ``val_<domain>``."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    section = cfg.stages.get(run.section)
    max_len = section.max_length or cfg.model.max_length

    route_columns = None
    if run.stage == "router" and section.route_supervision > 0:
        route_columns = route_targets(run.variant, list(run.domains))

    def tok(ds: Any, routes: dict[str, int] | None = None) -> Any:
        return tokenized_dataset(ds, tok_dir, max_len, route_columns=routes)

    out: dict[str, Any] = {}
    if run.pinned:
        for d in run.pinned:
            out[f"train_{d}"] = tok(read_dataset(storage, d, "train")).materialize()
            if validate:
                out[f"val_{d}"] = tok(read_dataset(storage, d, "validation")).materialize()
        return out
    if run.stage == "router":
        domains = [d for d in run.data if d != "general"]
        mix = read_dataset(storage, domains, "train")
        frac = section.general_fraction
        if frac > 0 and "general" in run.data:
            n_general = int(mix.count() * frac / max(1e-9, 1 - frac))
            general = read_dataset(storage, "general", "train").random_shuffle(
                seed=section.seed).limit(n_general)
            mix = mix.union(general)
        train = mix.random_shuffle(seed=section.seed)
    else:
        train = read_dataset(storage, list(run.data), "train").random_shuffle(seed=section.seed)
    out["train"] = tok(train, route_columns).materialize()
    if CLASSIFIER in run.trains:
        out[CLASSIFY_KEY] = classifier_dataset(
            cfg, storage, load_tokenizer(tok_dir), [d for d in run.domains], section).materialize()
    if validate:
        # one validation set per domain: the loop reports each domain's loss and their
        # average (the paper's checkpoint selection rule), which ranks sweep trials
        val_domains = [d for d in run.data if d != "general"] or list(run.data)
        for d in val_domains:
            out[f"val_{d}"] = tok(read_dataset(storage, d, "validation")).materialize()
    return out


def route_targets(variant: str, domains: list[str]) -> dict[str, int]:
    """Router supervision's target gate column per domain: Flan's columns are
    ``[universal, *domains]`` and general text targets the universal expert; Res's are the
    domains, and general text has no target (its softmax cannot say "no domain expert";
    request-level routing can)."""
    offset = 1 if variant == "flan" else 0
    out = {d: i + offset for i, d in enumerate(domains)}
    if variant == "flan":
        out["general"] = 0
    return out


def run_datasets(cfg: ModulaConfig, run: StageRun, storage: Storage | None = None,
                 validate: bool = False) -> dict[str, Any]:
    """The materialized Ray Data inputs of ``run`` (``run_stage(datasets=...)`` takes them: a
    sweep builds them once for all its trials)."""
    storage = storage or Storage(cfg.storage)
    return _run_datasets(cfg, run, storage, resolve_base_dir(cfg, storage), validate)


# ------------------------------------------------------------------------------------ runs


def _trainer(cfg: ModulaConfig, run: StageRun, storage: Storage, datasets: dict[str, Any],
             inputs_key: str | None, board: ProgressBoard, pad_id: int, validate: bool,
             callbacks: list[Any] | None = None) -> Any:
    """The run's TorchTrainer. What a worker reads travels as storage keys (the earlier
    stages' experts: ``inputs_key``) or as values (the config; the tokenizer's files inside the
    datasets' map functions), never as a path on the driver's machine: a worker may run on
    another node (docs/ray.md, "Several nodes")."""
    import ray.train
    from ray.train.torch import TorchTrainer

    section = cfg.stages.get(run.section)
    sc = section.scaling
    storage_path, fs = storage.ray_storage(TRAIN_RUNS)
    return TorchTrainer(
        adapter_loop,
        train_loop_config={"cfg": cfg, "run": run, "inputs_key": inputs_key, "board": board,
                           "pad_id": pad_id, "validate": validate,
                           "val_domains": sorted(k[4:] for k in datasets
                                                 if k.startswith("val_") and not run.pinned)},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=sc.resources_per_worker(),
                                               placement_strategy=sc.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=section.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )


def _parallel_runs(cfg: ModulaConfig, runs: list[StageRun]) -> int:
    """How many of a wave's runs fit the cluster at once (every resource a worker reserves:
    CPUs, GPUs, custom resources)."""
    import ray

    total = ray.cluster_resources()
    sc = cfg.stages.get(runs[0].section).scaling
    fit = min(float(total.get(name, 0.0)) // max(amount * sc.num_workers, 1e-9)
              for name, amount in sc.resources_per_worker().items())
    return int(max(1, min(len(runs), fit)))


def _collect(result: Any, run: StageRun, storage: Storage, work_key: str, wall: float,
             num_workers: int) -> RunCost:
    if result.error is not None:
        raise StageError(f"run {run.name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise StageError(f"run {run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        experts = Path(d) / EXPERTS_DIR
        cost_path = Path(d) / "cost.json"
        if not cost_path.is_file():
            raise StageError(f"run {run.name}: the final checkpoint has no cost record "
                             "(it was not written by the last step)")
        cost = json.loads(cost_path.read_text())
        for name in run.trains:
            f = experts / expert_file(name)
            if not f.is_file():
                raise StageError(f"run {run.name}: the final checkpoint lacks expert {name!r}")
            storage.upload_file(f, f"{work_key}/{expert_file(name)}")
    metrics = dict(result.metrics or {})
    rc = RunCost(
        run=run.name, stage=run.stage, variant=run.variant, trains=list(run.trains),
        trainable_parameters=int(cost["trainable_parameters"]), tokens=int(cost["tokens"]),
        steps=int(cost["steps"]), num_workers=int(cost["world_size"]),
        wall_seconds=round(wall, 2), loop_seconds=round(float(cost["loop_seconds"]), 2),
        worker_seconds=round(float(cost["loop_seconds"]) * int(cost["world_size"]), 2),
        final_loss=cost.get("final_loss"), resumed=int(cost.get("resumed", 0)),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        effective_batch=int(cost.get("effective_batch", 0)),
        nodes=list(cost.get("nodes", [])), node_history=list(cost.get("node_history", [])),
    )
    storage.write_text(f"{work_key}/costs/{run.name}.json", json.dumps(rc.to_dict(), indent=2))
    return rc


def run_stage(cfg: ModulaConfig, runs: list[StageRun], storage: Storage | None = None,
              name: str | None = None, console: Any | None = None, show_progress: bool = True,
              validate: bool = False, callbacks: list[Any] | None = None,
              output_name: str | None = None,
              datasets: dict[str, Any] | None = None) -> list[RunCost]:
    """Run one wave of independent runs (side by side as resources allow); their experts land
    in the workspace. Returns the cost of each run.

    ``output_name``: write the runs' experts and costs to that name's workspace instead of
    ``name``'s, which still provides the earlier stages' experts (a sweep's trials).
    ``datasets``: prebuilt inputs (:func:`run_datasets`) every run of the wave uses.
    """
    console = console or Console()
    storage = storage or Storage(cfg.storage)
    check_base_model(cfg, storage)
    connect(cfg.cluster)
    needed = sorted({d for r in runs for d in r.data})
    ensure_data(cfg, storage, needed)
    tok_dir = resolve_base_dir(cfg, storage)
    pad_id = int(load_tokenizer(tok_dir).pad_token_id or 0)
    variant = runs[0].variant
    work_key = workspace_key(cfg, name, variant)
    # the workers fetch the earlier stages' experts from the workspace themselves
    inputs_key = work_key if any(r.inputs for r in runs) else None
    parallel = _parallel_runs(cfg, runs)
    costs: list[RunCost] = []
    for i in range(0, len(runs), parallel):
        wave = runs[i:i + parallel]
        jobs, boards, starts = [], [], {}
        for run in wave:
            board = ProgressBoard(f"modula-progress-{run.name}-{os.getpid()}").create()
            boards.append(board)
            run_data = datasets if datasets is not None else _run_datasets(
                cfg, run, storage, tok_dir, validate)
            trainer = _trainer(cfg, run, storage, run_data, inputs_key, board, pad_id,
                               validate, callbacks)

            def fit(trainer: Any = trainer, run: StageRun = run,
                    walls: dict[str, float] = starts) -> Any:
                t0 = time.time()
                try:
                    res = trainer.fit()
                except Exception as exc:  # Train V2 raises a worker's error from fit()
                    raise StageError(f"run {run.name} failed: {exc}") from exc
                walls[run.name] = time.time() - t0
                return res

            label = run.stage if run.stage != "domains" else "domain " + "+".join(run.trains)
            section = cfg.stages.get(run.section)
            console.print(f"{variant} {label}: " + batch_line(
                section, section.max_length or cfg.model.max_length, len(run.pinned) or 1))
            jobs.append(FitJob(f"{variant} {label}", fit, board, section.steps))
        try:
            results = fit_many_with_progress(jobs, console, show=show_progress)
        finally:
            for b in boards:
                b.close()
        for run, result in zip(wave, results, strict=True):
            out_key = workspace_key(cfg, output_name, variant) if output_name else work_key
            costs.append(_collect(result, run, storage, out_key, starts[run.name],
                                  cfg.stages.get(run.section).scaling.num_workers))
    return costs


def train(cfg: ModulaConfig, stage: str = "all", storage: Storage | None = None,
          name: str | None = None, console: Any | None = None, show_progress: bool = True,
          publish_result: bool = True) -> list[RunCost]:
    """Train a stage (or ``all`` of them, in order) and, once the model is complete, publish."""
    console = console or Console()
    storage = storage or Storage(cfg.storage)
    costs: list[RunCost] = []
    for wave in plan_stage(cfg, stage, name):
        costs += run_stage(cfg, wave, storage, name, console, show_progress)
    complete = stage in ("all", "router", "lora", "molora")
    if publish_result and complete:
        variant = stage if stage in ("lora", "molora") else cfg.modula.variant
        publish(cfg, storage, name=name, variant=variant, costs=costs, console=console)
    return costs


# ------------------------------------------------------------------------------------ publish


def publish(cfg: ModulaConfig, storage: Storage | None = None, name: str | None = None,
            variant: str | None = None, costs: list[RunCost] | None = None,
            console: Any | None = None, base_version: int | None = None,
            domains: list[str] | None = None,
            extra_metadata: dict[str, Any] | None = None) -> Any:
    """Assemble the workspace's experts into a complete experts directory and publish it
    (`extra_metadata` goes into the version's metadata, e.g. where an imported expert came
    from)."""
    console = console or Console()
    storage = storage or Storage(cfg.storage)
    variant = variant or cfg.modula.variant
    work_key = workspace_key(cfg, name, variant)
    domain_list = domains if domains is not None else (
        [] if variant == "lora" else cfg.expert_domains())
    base, _ = load_base_model(cfg, storage)
    model = attach_modula(base, cfg.modula.model_copy(update={"variant": variant}),
                          domains=list(domain_list))
    run_costs = {c.run: c for c in (costs or [])}
    all_costs = _stored_costs(storage, work_key)
    with tempfile.TemporaryDirectory(prefix="modula-publish-") as tmp:
        src = Path(tmp) / "work"
        if not storage.list(work_key):
            raise StageError(f"cannot publish: no expert has been trained for {variant} "
                             f"({storage.uri(work_key)} is empty)")
        storage.download_dir(work_key, src)
        names = (["universal"] if variant != "molora" else []) + list(domain_list) + (
            ["routers"] if variant != "lora" else [])
        if variant in ("flan", "res") and storage.exists(f"{work_key}/{expert_file(CLASSIFIER)}"):
            names.append(CLASSIFIER)  # the request router (router stage), when trained
        for n in names:
            f = src / expert_file(n)
            if not f.is_file():
                raise StageError(f"cannot publish: expert {n!r} has not been trained "
                                 f"({storage.uri(f'{work_key}/{expert_file(n)}')} is missing)")
            load_expert(model, n, f)
        out = Path(tmp) / "experts"
        manifest = save_experts(model, out, base_model_id=cfg.model.base)
        specs = {}
        for e in manifest["experts"]:
            trained = [c for c in all_costs.values() if e["name"] in c.get("trains", [])]
            last = trained[-1] if trained else {}
            specs[e["name"]] = ExpertSpec(
                file=e["file"], kind={"routers": "router", CLASSIFIER: CLASSIFIER}.get(e["name"]),
                training={k: last.get(k) for k in ("run", "stage", "steps", "tokens",
                                                   "trainable_parameters", "worker_seconds",
                                                   "nodes")
                          if k in last},
                metrics={"final_loss": last.get("final_loss")} if last else {},
            )
        registry = Registry.from_config(cfg)
        version = registry.publish(
            published_name(cfg, variant, name), out,
            metadata={"base_model": {"id": cfg.model.base,
                                     "sha256": manifest["base_model"]["fingerprint"]},
                      "variant": variant, "domains": manifest["domains"],
                      "config": {"modula": cfg.modula.model_dump(mode="json"),
                                 "stages": cfg.stages.model_dump(mode="json")},
                      "runs": [c.to_dict() for c in run_costs.values()],
                      **(extra_metadata or {})},
            experts=specs, base_version=base_version,
        )
    console.print(f"published {version.model} v{version.version} "
                  f"({len(version.experts)} experts, {version.size / 1e6:.2f} MB)")
    return version


def _stored_costs(storage: Storage, work_key: str) -> dict[str, dict[str, Any]]:
    out = {}
    for key in storage.list(f"{work_key}/costs"):
        try:
            c = json.loads(storage.read_text(key))
        except (ValueError, FileNotFoundError):
            continue
        out[c["run"]] = c
    return dict(sorted(out.items(), key=lambda kv: kv[1].get("wall_seconds", 0)))


# ------------------------------------------------------------------------------------ add-domain


def _base_names(cfg: ModulaConfig, storage: Storage, base: Any, published: str | None
                ) -> set[str]:
    """The names this model's base goes by: the config's ``model.base``, the published id,
    the local directory and the HF config's ``_name_or_path`` (each also by its last path
    part, lower-cased)."""
    names = {cfg.model.base, published or "", str(resolve_base_dir(cfg, storage)),
             str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")}
    out = set()
    for n in names:
        n = n.rstrip("/")
        if n:
            out |= {n, n.rsplit("/", 1)[-1].lower()}
    return out


def import_peft_expert(cfg: ModulaConfig, storage: Storage, local: Any, domain: str,
                       adapter_dir: str | os.PathLike[str], dest: Path,
                       any_base: bool = False) -> dict[str, Any]:
    """Turn a PEFT LoRA adapter directory into the expert file of the new domain `domain` of
    the fetched version `local`, at `dest`; returns where it came from. Refused with a clear
    message (nothing written): another variant than Flan, a pickle instead of safetensors, an
    adapter for another base model (by name, unless `any_base`) or for other layer shapes."""
    if cfg.modula.variant != "flan":
        raise PlanError(f"--from-peft needs variant flan, not {cfg.modula.variant!r}: a "
                        "MoDULA-Res domain expert reads the universal expert's output through "
                        "a LeakyReLU, which a PEFT LoRA adapter (B A x) is not")
    adapter_dir = Path(adapter_dir)
    try:
        pcfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"--from-peft {adapter_dir}: no readable adapter_config.json ({exc})"
                        ) from None
    base, _ = load_base_model(cfg, storage)
    mv = local.manifest
    theirs = str(pcfg.get("base_model_name_or_path") or "").rstrip("/")
    ours = _base_names(cfg, storage, base, mv.base_model.id if mv.base_model else None)
    if theirs and not any_base and theirs not in ours and \
            theirs.rsplit("/", 1)[-1].lower() not in ours:
        raise PlanError(f"--from-peft {adapter_dir}: the adapter was trained on base model "
                        f"{theirs!r}, this model's base is {cfg.model.base!r}; if they are "
                        "the same model under another name, pass --any-base")
    model = load_modula(base, local.path)
    try:
        import_peft(model, adapter_dir, domain)
    except ValueError as exc:
        raise PlanError(f"--from-peft: {exc}") from None
    info = save_expert(model, domain, dest)
    weights = adapter_dir / "adapter_model.safetensors"
    return {"path": str(adapter_dir.resolve()), "base_model_name_or_path": theirs or None,
            "r": pcfg.get("r"), "lora_alpha": pcfg.get("lora_alpha"),
            "adapter_sha256": sha256_file(weights), "expert_sha256": info["sha256"]}


def add_domain(cfg: ModulaConfig, domain: str, data: str | None = None,
               storage: Storage | None = None, name: str | None = None,
               console: Any | None = None, show_progress: bool = True,
               metric: str = "exact_match", from_peft: str | os.PathLike[str] | None = None,
               any_base: bool = False) -> tuple[Any, list[RunCost]]:
    """Plug a new domain into the published model: train its expert (stage 2), or import it
    from a PEFT LoRA adapter (`from_peft`), then train the routers (stage 3) only, and publish
    on top of the latest version. Old experts are not touched."""
    console = console or Console()
    storage = storage or Storage(cfg.storage)
    variant = cfg.modula.variant
    if variant not in ("flan", "res"):
        raise PlanError(f"add-domain needs a MoDULA variant (flan, res), not {variant!r}: "
                         "the baselines are retrained from scratch")
    registry = Registry.from_config(cfg)
    rname = published_name(cfg, variant, name)
    latest = registry.show(rname)
    old_domains = latest.metadata.get("domains") or latest.domains()
    if domain in old_domains:
        raise PlanError(f"domain {domain!r} is already in {rname} v{latest.version} "
                         f"(domains: {', '.join(old_domains)})")
    # the config gains the domain (a built-in one, or user data at `data`)
    known = {d.name for d in cfg.domains}
    if domain in known:
        domains_cfg = [d.model_copy(update={"reserved": False}) if d.name == domain else d
                       for d in cfg.domains]
    else:
        if data is None:
            why = " (the routers learn from it when to pick the imported expert)" \
                if from_peft is not None else ""
            raise PlanError(f"domain {domain!r} is not in the config: give its data with "
                            f"--data{why}")
        try:
            new = DomainConfig(name=domain, source=data, metric=metric)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise PlanError(f"domain {domain!r}: {'.'.join(map(str, err['loc']))}: "
                            f"{err['msg']}") from None
        domains_cfg = [*cfg.domains, new]
    cfg = cfg.model_copy(update={"domains": domains_cfg})
    new_order = [*old_domains, domain]

    # the workspace starts as exactly the published experts
    work_key = workspace_key(cfg, name, variant)
    imported = None
    with tempfile.TemporaryDirectory(prefix="modula-add-") as tmp:
        local = registry.fetch(rname, latest.version, Path(tmp) / "latest")
        if from_peft is not None:  # checked before anything is written
            target = Path(tmp) / expert_file(domain)
            imported = import_peft_expert(cfg, storage, local, domain, from_peft, target,
                                          any_base)
        for n, e in local.manifest.experts.items():
            if n not in ("routers", CLASSIFIER):  # both retrain with the new domain
                storage.upload_file(local.path / e.file, f"{work_key}/{expert_file(n)}")
        if imported is not None:
            storage.upload_file(target, f"{work_key}/{expert_file(domain)}")
            console.print(f"imported {domain!r} from the PEFT adapter {from_peft}")
    costs: list[RunCost] = []
    if imported is None:
        (expert_run,) = stage_runs(cfg, "domains", domains=[domain], name=name)
        expert_run = StageRun(**{**expert_run.__dict__, "domains": tuple(new_order)})
        costs += run_stage(cfg, [expert_run], storage, name, console, show_progress)
    (router_run,) = stage_runs(cfg, "router", domains=new_order, name=name)
    costs += run_stage(cfg, [router_run], storage, name, console, show_progress)
    try:
        version = publish(cfg, storage, name=name, variant=variant, costs=costs,
                          console=console, base_version=latest.version, domains=new_order,
                          extra_metadata={"imported": {domain: imported}} if imported else None)
    except RegistryConflict as exc:
        raise RegistryConflict(
            f"{exc}. {domain!r} was trained on v{latest.version}, which is no longer the latest: "
            f"run `modula add-domain {domain}` again to add it to the latest version") from None
    return version, costs
