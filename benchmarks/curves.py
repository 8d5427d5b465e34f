"""Validation-loss curves of the domain stage, to choose its steps and batch from them (not a test).

Ray-free, in this process, on a storage root that ``make demo`` / ``modula demo`` filled (the
splits ``data/<domain>/*.parquet``, the tokenizer, the base model under
``models/builtin-tiny/<fp>/``): for each expert domain of the config (default: code, math,
units) and each setting ``ROWSxSTEPS`` of ``--settings``, the domain expert of a fresh MoDULA
model (the config's variant, default Res) trains as a stage-2 run of ``modula train`` trains it:

- the model is the trainers' own (``build_stage_model`` of ``modula/trainers/loop.py``: the base
  model, MoDULA attached with float32 experts, the universal expert loaded,
  ``set_stage("domain:<name>")`` so that exactly that expert trains, alone in the path);
- the data is the domain's train split, shuffled once (seed), each example encoded as the
  trainers do (``encode_example``: prompt tokens masked) and greedily ``pack``-ed into rows of
  the stage's ``max_length``; the rows are reshuffled at every pass;
- the step is ``accumulated_step`` (the loop's: ``grad_accum_steps`` micro-batches, gradient
  clipped to norm 1) under AdamW (``make_optimizer``, every tensor decayed) and the stage's
  warmup + cosine schedule (``make_scheduler``); the stage is ``stages.domain`` with the
  setting's ``batch_size`` / ``steps``, ``--lr``, and its warmup scaled to the steps (the config's
  share: 20 of 320 steps = 1/16).

Every ``--every`` steps (default: a tenth of the run) and before the first, the validation
response loss is measured: ``response_nll`` of ``modula/eval/evaluate.py`` (nats per response
token, prompt masked, the trained path) over the first ``--val-examples`` rows of the domain's
validation split. At the end, for the domains whose metric is exact match, ``evaluate_domain``
(``modula eval``'s code) generates greedily for the first ``--em-examples`` validation prompts,
each pinned to the domain's expert (``pinned_routing``, inference stage), and scores them with
``exact_match``.

The universal expert the domain experts build on (Res: a domain expert reads the universal
expert's output, so with an untrained one it gets no gradient at all): ``--universal auto``
(default) takes the latest version of the config's model published in the storage's registry,
else the one the universal stage left in the workspace (``work/<model>/<variant>/``), else
trains one here, Ray-free, with ``stages.universal``'s budget on the general train split
(cached under the system temporary folder); ``registry``, ``workspace``, ``train`` or a file
path force one source. The table and the JSON say which was used.

Two comparisons (issue 14):

- **equal examples** (default, ``--settings 16x80,4x320``): the same rows, few large steps vs
  many small ones; the curves line up on the x axis (rows seen);
- **equal optimizer steps**: ``--settings 16x320,4x320`` (the same number of updates, 4x the
  rows for the larger batch).

Results: a table per domain on stdout (setting, rows seen, steps, final and best validation
loss and its step, exact match, seconds), ``benchmarks/results/<name>.json`` with the curves
and ``<name>.png`` (one panel per domain: validation loss against rows seen, one line per
setting).

    .venv/bin/python benchmarks/curves.py                                  # equal examples
    .venv/bin/python benchmarks/curves.py --settings 16x320,4x320 --name curves-steps \\
        --x steps                                                          # equal steps
    .venv/bin/python benchmarks/curves.py --domains units --settings 4x8,16x2 --every 2 \\
        --val-examples 16 --em-examples 8 --out /tmp/curves --name smoke   # a smoke run (~1 min)
    .venv/bin/python benchmarks/curves.py --from-json benchmarks/results/curves.json   # redraw

Cost on the demo's tiny base model, one torch thread: about 0.7 s a step of 4 rows (a row is a
row whatever the batch: 16x80 costs about what 4x320 does), so the default run is about 4 min
of training per setting and domain, some 25 min in all with the evaluations (estimated from
the step times, not timed end to end); ``--settings 16x320,4x320`` is 2.5x that. ``--threads``
(default 2) is torch's: on a machine whose other core is busy, 2 threads were 14x slower than
1 (a step of 4 rows: 9 s against 0.7 s), so give ``--threads 1`` there.

``--root`` is the storage root (default ``runs``, the demo's); ``--config`` / ``--set`` as for
``modula`` (``--set stages.pretrain.steps=400`` finds the base model paper.py pretrained). When
the config's built-in base model is not in the root but exactly one other is, that one is used
(and named).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _k, _v in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"),
               ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=80)

UNIVERSAL_SOURCES = ("auto", "registry", "workspace", "train")


# ------------------------------------------------------------------------------------ setup


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"16x80,4x320"`` -> [(16, 80), (4, 320)]: (batch rows, optimizer steps)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            rows, steps = (int(x) for x in part.split("x"))
        except ValueError:
            raise SystemExit(f"--settings: {part!r} is not ROWSxSTEPS (e.g. 16x80)") from None
        if rows < 1 or steps < 1:
            raise SystemExit(f"--settings: {part!r}: rows and steps must be >= 1")
        out.append((rows, steps))
    if not out:
        raise SystemExit("--settings: no setting given")
    return out


def comparison(settings: list[tuple[int, int]]) -> str:
    """What the settings hold equal: ``equal examples``, ``equal steps`` or ``mixed``."""
    if len(settings) > 1 and len({r * s for r, s in settings}) == 1:
        return "equal examples"
    if len(settings) > 1 and len({s for _, s in settings}) == 1:
        return "equal steps"
    return "mixed" if len(settings) > 1 else "one setting"


def build_config(args: argparse.Namespace) -> Any:
    from modula.config import load_config

    sets = [f"storage.root={args.root}", *(args.set or [])]
    return load_config(args.config, sets)


def with_base(cfg: Any, base: str) -> Any:
    from modula.config import config_from_dict

    raw = cfg.model_dump(mode="python")
    raw["model"]["base"] = base
    return config_from_dict(raw)


def resolve_base(cfg: Any, storage: Any) -> tuple[Any, str]:
    """The config, pointed at a stored base model: its own, or the only built-in one stored."""
    from modula.basemodel import MARKER, BaseModelMissing, resolve_base_dir
    from modula.infra.layout import BUILTIN_MODELS

    try:
        return cfg, str(resolve_base_dir(cfg, storage))
    except BaseModelMissing as exc:
        if not cfg.model.is_builtin or storage.is_s3:
            raise SystemExit(str(exc)) from None
        root = Path(storage.uri(BUILTIN_MODELS))
        stored = sorted(p for p in root.glob("*") if (p / MARKER).is_file()) if root.is_dir() \
            else []
        if len(stored) != 1:
            raise SystemExit(
                f"{exc}\nstored built-in models: {[str(p) for p in stored] or 'none'}; pass "
                "--set model.base=<one of them> (or the --set of the config that built it)"
            ) from None
        console.print(f"[yellow]the config's built-in base model is not stored; using the "
                      f"only one in {root}: {stored[0].name}")
        return with_base(cfg, str(stored[0])), str(stored[0])


def domain_run(cfg: Any, domain: str) -> Any:
    """The ``StageRun`` of stage 2 that trains `domain` alone (the model keeps every domain
    expert of the config, in router order, as ``modula train`` builds it)."""
    from modula.trainers.plan import stage_runs

    run = stage_runs(cfg, "domains")[0]
    domains = run.domains if domain in run.domains else (*run.domains, domain)  # a reserved one
    return dataclasses.replace(run, domains=domains, trains=(domain,), data=(domain,), pinned=())


def stage_for(cfg: Any, section: str, rows: int, steps: int, lr: float | None) -> Any:
    """``stages.<section>`` with this batch and budget; warmup scaled to the steps."""
    from modula.config.schema import StageConfig

    base = cfg.stages.get(section)
    warmup = 0
    if base.warmup_steps:
        warmup = min(steps, max(1, round(base.warmup_steps * steps / base.steps)))
    return StageConfig.model_validate({
        **base.model_dump(mode="python"), "steps": steps, "batch_size": rows,
        "lr": lr if lr is not None else base.lr, "warmup_steps": warmup,
        "scaling": {**base.scaling.model_dump(mode="python"), "num_workers": 1},
    })


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ data


def packed_rows(tok: Any, records: list[dict[str, Any]], max_length: int, seed: int,
                train_on_prompt: bool = False) -> dict[str, Any]:
    """The records shuffled once, encoded and packed as the trainers pack them; plus the
    number of examples in each row (``examples``)."""
    import numpy as np
    import torch

    from modula.data.encode import encode_example, pack

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    encoded = [encode_example(tok, records[i]["prompt"], records[i]["response"], max_length,
                              train_on_prompt) for i in order]
    packed = pack(encoded, max_length, tok.pad_token_id)
    starts = (packed["position_ids"] == 0) & (packed["input_ids"] != tok.pad_token_id)
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()}
    out["examples"] = torch.from_numpy(starts.sum(1).astype(np.int64))
    return out


def batches(rows: dict[str, Any], size: int, seed: int) -> Any:
    """Endless batches of `size` rows, reshuffled at every pass, the last partial one dropped."""
    import torch

    n = int(rows["input_ids"].shape[0])
    if n < size:
        raise SystemExit(f"the split packs into {n} rows, fewer than a batch of {size}")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - size + 1, size):
            idx = perm[i: i + size]
            yield {k: v[idx] for k, v in rows.items()}
        epoch += 1


# ------------------------------------------------------------------------------------ training


def val_loss(model: Any, tok: Any, records: list[dict[str, Any]], max_length: int,
             batch_size: int) -> float:
    """Mean response loss (nats per response token) on `records`, through ``response_nll``."""
    from modula.eval.evaluate import response_nll

    was = model.training
    model.eval()
    try:
        total, count = response_nll(model, tok, records, max_length, batch_size)
    finally:
        model.train(was)
    return total / count if count else float("nan")


def fit(model: Any, stage: Any, rows: dict[str, Any], device: Any, every: int,
        on_eval: Any) -> dict[str, Any]:
    """Train the model's trainable parameters for ``stage.steps`` steps (the loop's step);
    ``on_eval(step, rows_seen, examples_seen, train_loss)`` before the first step, every
    `every` steps and after the last."""
    from modula.trainers.common import accumulated_step, make_optimizer, make_scheduler

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, stage.lr, stage.weight_decay, decay_all=True)
    scheduler = make_scheduler(optimizer, stage)
    it = batches(rows, stage.per_worker_batch(), stage.seed)

    def forward(batch: dict[str, Any], _s: int) -> Any:
        return model(input_ids=batch["input_ids"], labels=batch["labels"],
                     position_ids=batch["position_ids"], use_cache=False)

    seen_rows = seen_examples = 0
    losses: list[float] = []
    on_eval(0, 0, 0, None)
    for step in range(1, stage.steps + 1):
        micro = []
        for _ in range(stage.grad_accum_steps):
            b = next(it)
            seen_rows += int(b["input_ids"].shape[0])
            seen_examples += int(b.pop("examples").sum())
            micro.append([b])
        loss, _ = accumulated_step(forward, micro, optimizer, params, precision=stage.precision,
                                   device=device, model=model)
        scheduler.step()
        losses.append(loss)
        if step % every == 0 or step == stage.steps:
            on_eval(step, seen_rows, seen_examples, sum(losses) / len(losses))
            losses = []
    return {"rows_seen": seen_rows, "examples_seen": seen_examples}


def universal_candidates(cfg: Any, storage: Any, how: str) -> Any:
    """(file, where it came from) of each stored universal expert `how` allows, in order."""
    from modula.infra.layout import cache_dir, expert_file, published_name, workspace_key
    from modula.infra.registry import Registry

    if how not in UNIVERSAL_SOURCES:
        path = Path(how).expanduser()
        if not path.is_file():
            raise SystemExit(f"--universal {how}: no such file")
        yield path, f"file {path}"
        return
    if how in ("auto", "registry"):
        name = published_name(cfg)
        registry = Registry(storage)
        version = registry.latest_version(name)
        mv = registry.show(name, version) if version else None
        if mv is not None and "universal" in mv.experts and mv.variant == cfg.modula.variant:
            where = hashlib.sha256(storage.uri().encode()).hexdigest()[:10]
            local = registry.fetch(name, version,
                                   dest=cache_dir("curves", where, f"{name}-v{version}"))
            yield local.expert_path("universal"), f"registry {name} v{version}"
        elif how == "registry":
            raise SystemExit(f"the registry of {storage.uri()} has no published {name!r} "
                             f"({cfg.modula.variant}) with a universal expert")
    if how in ("auto", "workspace"):
        key = f"{workspace_key(cfg)}/{expert_file('universal')}"
        if storage.exists(key):
            if storage.is_s3:
                dest = cache_dir("curves", hashlib.sha256(storage.uri(key).encode()
                                                          ).hexdigest()[:16], expert_file("universal"))
                yield storage.download_file(key, dest), f"workspace {storage.uri(key)}"
            else:
                yield Path(storage.uri(key)), f"workspace {storage.uri(key)}"
        elif how == "workspace":
            raise SystemExit(f"{storage.uri(key)} does not exist")


def universal_expert(cfg: Any, storage: Any, how: str, device: Any, seed: int, domain: str
                     ) -> tuple[Path, str]:
    """(file of the universal expert, where it came from): the first stored one that loads
    into this config's model (same base model, variant, ranks), else one trained here."""
    from modula.model import ExpertFileError
    from modula.trainers.loop import build_stage_model

    for path, source in universal_candidates(cfg, storage, how):
        try:
            build_stage_model(cfg, domain_run(cfg, domain), {"universal": path})
        except ExpertFileError as exc:
            if how != "auto":
                raise SystemExit(f"{source}: {exc}") from None
            console.print(f"[yellow]{source} does not fit this model: {exc}")
            continue
        return path, source
    if how == "train" or how == "auto":
        return train_universal(cfg, storage, device, seed)
    raise SystemExit(f"--universal {how}: nothing found")


def train_universal(cfg: Any, storage: Any, device: Any, seed: int) -> tuple[Path, str]:
    """The universal stage, Ray-free, with ``stages.universal``'s budget on the general train
    split; cached by what it depends on."""
    from modula.basemodel import resolve_base_dir
    from modula.data.build import domain_fingerprint
    from modula.data.io import read_records
    from modula.data.tokenizer import load_tokenizer
    from modula.infra.layout import cache_dir
    from modula.model import save_expert
    from modula.trainers.loop import build_stage_model
    from modula.trainers.plan import stage_runs

    st = cfg.stages.universal
    (run,) = stage_runs(cfg, "universal")
    base_dir = resolve_base_dir(cfg, storage)
    key = hashlib.sha256(json.dumps([
        str(base_dir), (base_dir / "config.json").stat().st_mtime_ns,
        cfg.modula.model_dump(mode="json"), st.model_dump(mode="json"), list(run.domains),
        domain_fingerprint(cfg.domain("general")), cfg.model.max_length, seed,
    ], sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir("curves", f"universal-{key}.safetensors")
    note = (f"trained here, Ray-free: stages.universal ({st.steps} steps x {st.batch_size} "
            f"rows, lr {st.lr:g}) on general")
    if path.is_file():
        return path, note + f" (cached: {path})"
    console.print(f"no published or workspace universal expert: training one ({note[14:]})")
    tok = load_tokenizer(base_dir)
    max_len = st.max_length or cfg.model.max_length
    seed_all(seed)
    model = build_stage_model(cfg, run, {}).to(device)
    rows = packed_rows(tok, read_records(storage, "general", "train"), max_len, st.seed)
    t0 = time.time()

    def on_eval(step: int, *_: Any) -> None:
        if step:
            console.print(f"  universal: step {step}/{st.steps} ({time.time() - t0:.0f}s)")

    fit(model, stage_for(cfg, "universal", st.batch_size, st.steps, st.lr), rows, device,
        max(1, st.steps // 4), on_eval)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_expert(model, "universal", path)
    return path, note


def train_curve(cfg: Any, storage: Any, tok: Any, domain: str, rows_per_step: int, steps: int,
                args: argparse.Namespace, universal: Path, device: Any) -> dict[str, Any]:
    """One (domain, setting) run: the curve, the final scores, the time."""
    from modula.data.io import read_records
    from modula.eval.evaluate import evaluate_domain, pinned_routing
    from modula.trainers.loop import build_stage_model

    stage = stage_for(cfg, "domain", rows_per_step, steps, args.lr)
    stage = stage.model_copy(update={"seed": args.seed})
    max_len = stage.max_length or cfg.model.max_length
    run = domain_run(cfg, domain)
    seed_all(args.seed)  # the same fresh expert for every setting
    model = build_stage_model(cfg, run, {"universal": universal}).to(device)
    train = packed_rows(tok, read_records(storage, domain, "train"), max_len, args.seed)
    val = read_records(storage, domain, "validation", limit=args.val_examples)
    every = args.every or max(1, steps // 10)
    label = f"{rows_per_step}x{steps}"
    curve: list[dict[str, Any]] = []
    t0 = time.time()
    eval_s = 0.0

    def on_eval(step: int, seen: int, examples: int, train_loss: float | None) -> None:
        nonlocal eval_s
        t = time.time()
        v = val_loss(model, tok, val, max_len, cfg.eval.batch_size)
        eval_s += time.time() - t
        curve.append({"step": step, "rows_seen": seen, "examples_seen": examples,
                      "val_loss": v, "train_loss": train_loss,
                      "seconds": round(time.time() - t0, 2)})
        tl = f", train {train_loss:.3f}" if train_loss is not None else ""
        console.print(f"  {domain} {label}: step {step:>4}/{steps}, rows {seen:>5}: val "
                      f"{v:.4f}{tl} ({time.time() - t0:.0f}s)")

    seen = fit(model, stage, train, device, every, on_eval)
    train_s = time.time() - t0 - eval_s
    best = min(curve, key=lambda c: c["val_loss"] if math.isfinite(c["val_loss"]) else math.inf)
    out: dict[str, Any] = {
        "setting": label, "rows": rows_per_step, "steps": steps, "lr": stage.lr,
        "warmup_steps": stage.warmup_steps, "every": every,
        "packed_rows": int(train["input_ids"].shape[0]),
        "train_examples": int(train["examples"].sum()), **seen,
        "epochs": seen["rows_seen"] / max(1, int(train["input_ids"].shape[0])),
        "val_examples": len(val), "curve": curve,
        "final_val_loss": curve[-1]["val_loss"], "best_val_loss": best["val_loss"],
        "best_step": best["step"], "metric": cfg.domain(domain).metric,
        "exact_match": None, "em_examples": 0, "samples": [],
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
    }
    if cfg.domain(domain).metric == "exact_match" and args.em_examples > 0:
        t = time.time()
        model.set_stage(None)  # inference, the row pinned to the domain (modula eval --routing pinned)
        records = read_records(storage, domain, "validation", limit=args.em_examples)
        res = evaluate_domain(model, tok, cfg.domain(domain), records, max_len,
                              cfg.eval.max_new_tokens, cfg.eval.batch_size,
                              route=pinned_routing(model)(domain))
        out.update(exact_match=res.score, em_examples=res.n,
                   em_hits=round((res.score or 0.0) * res.n / 100), samples=res.samples,
                   em_seconds=round(time.time() - t, 1))
        console.print(f"  {domain} {label}: exact match {res.score:.1f} % of {res.n} "
                      f"({time.time() - t:.0f}s)")
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ------------------------------------------------------------------------------------ output


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        f"{v:.{digits}f}"


def print_tables(data: dict[str, Any]) -> None:
    s = data["settings"]
    for domain, d in data["domains"].items():
        t = Table(title=f"{domain} ({d['metric']}): validation response loss, nats/token",
                  caption=f"{s['comparison']}; lr {s['lr']:g}; {s['val_examples']} val "
                          f"examples; EM on {s['em_examples']}")
        for col in ("setting", "rows seen", "steps", "final", "best", "@ step", "EM %", "s"):
            t.add_column(col, justify="left" if col == "setting" else "right")
        for r in d["runs"]:
            em = "-" if r["exact_match"] is None else \
                f"{r['exact_match']:.1f} ({r.get('em_hits', 0)}/{r['em_examples']})"
            t.add_row(r["setting"], f"{r['rows_seen']:,}", str(r["steps"]),
                      _f(r["final_val_loss"]), _f(r["best_val_loss"]), str(r["best_step"]),
                      em, f"{r['seconds']:.0f}")
        console.print(t)
    u = data["universal"]
    console.print(f"universal expert: {u['source']}")


def plot(data: dict[str, Any], path: Path, x: str = "rows") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(data["domains"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.4), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        d = data["domains"][domain]
        for i, r in enumerate(d["runs"]):
            xs = [c["rows_seen" if x == "rows" else "step"] for c in r["curve"]]
            ys = [c["val_loss"] for c in r["curve"]]
            label = f"{r['rows']} rows x {r['steps']} steps"
            extra = r["setting"].removeprefix(f"{r['rows']}x{r['steps']}").strip()
            if extra:  # a merged results file names what else differs
                label += f", {extra}"
            if r["exact_match"] is not None:
                label += f" (EM {r['exact_match']:.0f} %)"
            ax.plot(xs, ys, f"C{i}-o", ms=3, label=label)
            best = next(c for c in r["curve"] if c["step"] == r["best_step"])
            ax.plot([best["rows_seen" if x == "rows" else "step"]], [best["val_loss"]],
                    f"C{i}*", ms=11)
        ax.set_xlabel("rows seen (packed rows of max_length tokens)" if x == "rows"
                      else "optimizer steps")
        ax.set_ylabel("validation response loss (nats/token)")
        ax.set_title(f"{domain} ({d['metric']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = data["settings"]
    fig.suptitle(f"domain stage, MoDULA-{s['variant'].capitalize()}: {s['comparison']} "
                 f"(lr {s['lr']:g}; * = best)", fontsize=9, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from modula.data.tokenizer import load_tokenizer
    from modula.infra.storage import Storage

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    cfg = build_config(args)
    storage = Storage(cfg.storage)
    cfg, base_dir = resolve_base(cfg, storage)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains \
        else cfg.expert_domains()
    known = cfg.expert_domains(include_reserved=True)
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise SystemExit(f"--domains: {unknown} are not expert domains of the config ({known})")
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = load_tokenizer(base_dir)
    universal, source = universal_expert(cfg, storage, args.universal, device, args.seed,
                                         domains[0])
    console.print(f"base model: {base_dir}\nvariant: {cfg.modula.variant}\nuniversal expert: "
                  f"{source}\n{comparison(settings)}: "
                  + ", ".join(f"{r}x{s}" for r, s in settings) + f", lr {args.lr:g}, "
                  f"{args.threads} torch thread(s) on {device}")
    t0 = time.time()
    out: dict[str, Any] = {}
    for domain in domains:
        console.rule(domain)
        runs = [train_curve(cfg, storage, tok, domain, rows, steps, args, universal, device)
                for rows, steps in settings]
        out[domain] = {"metric": cfg.domain(domain).metric, "runs": runs}
    lr = args.lr if args.lr is not None else cfg.stages.domain.lr
    return {
        "settings": {
            "settings": [f"{r}x{s}" for r, s in settings], "comparison": comparison(settings),
            "lr": lr, "seed": args.seed, "val_examples": args.val_examples,
            "em_examples": args.em_examples, "every": args.every, "variant": cfg.modula.variant,
            "domain_rank": cfg.modula.domain_rank, "universal_rank": cfg.modula.universal_rank,
            "max_length": cfg.stages.domain.max_length or cfg.model.max_length,
            "config_domain_stage": cfg.stages.domain.model_dump(mode="json"),
            "base_model": base_dir, "storage": storage.uri(), "threads": args.threads,
            "device": str(device), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "seconds": round(time.time() - t0, 1),
            "val_loss": "response_nll over the first val_examples validation rows, nats per "
                        "response token (prompt masked), the training path",
            "rows_seen": "packed rows of max_length tokens drawn by the optimizer steps",
        },
        "universal": {"source": source, "path": str(universal)},
        "domains": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT / "runs"), help="storage root (the demo's)")
    ap.add_argument("--config", type=Path, default=None,
                    help="config file (default: configs/default.yaml)")
    ap.add_argument("--set", action="append", help="a config override, as `modula --set`")
    ap.add_argument("--domains", default=None, help="comma-separated (default: the experts)")
    ap.add_argument("--settings", default="16x80,4x320",
                    help="ROWSxSTEPS,... (equal examples: 16x80,4x320; equal steps: "
                         "16x320,4x320)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of every setting")
    ap.add_argument("--every", type=int, default=None,
                    help="steps between validations (default: a tenth of each run)")
    ap.add_argument("--val-examples", type=int, default=64)
    ap.add_argument("--em-examples", type=int, default=60)
    ap.add_argument("--universal", default="auto",
                    help="auto | registry | workspace | train | a universal expert file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="curves", help="file stem of the JSON and PNG")
    ap.add_argument("--x", choices=("rows", "steps"), default="rows",
                    help="the plot's x axis: rows seen (default) or optimizer steps")
    ap.add_argument("--from-json", type=Path, help="redraw tables and plot from a results JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        data = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        from modula.eval.evaluate import finite

        (args.out / f"{args.name}.json").write_text(json.dumps(finite(data), indent=1) + "\n")
    print_tables(data)
    png = plot(data, args.out / f"{args.name}.png", args.x)
    console.print(f"wrote {png}" if args.from_json else
                  f"wrote {args.out / (args.name + '.json')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
