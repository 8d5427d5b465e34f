"""Training benchmark: stage 2 with domain experts side by side, and the cost of adding a domain.

Not a test. Everything runs through the trainers' own code (``run_stage``, ``add_domain``) on a
local Ray, with the built-in tiny base model (``model.tiny`` of ``configs/default.yaml``: the
architecture, the built-in tokenizer; randomly initialised by default, since costs do not depend
on the weights; ``--pretrain-steps N`` pretrains it first with ``run_pretrain``) and the built-in
domain suite of ``configs/default.yaml``:

(a) **Stage 2, n experts at once vs one after another**, n = 1 .. the config's domain experts
    (code, math, units): one ``run_stage`` call with a wave of n runs (side by side, as the
    cluster's resources allow) against n calls with a wave of one. Tokens/s end to end (every
    run's tokens over the stage's wall time: data, Ray Train start-up and the loops) and in
    the loops alone; every run has the same steps and batch.

(b) **Adding a domain vs retraining MoLoRA from scratch.** The MoDULA-Res model of (a)'s n = 3
    wave gets its routers and is published; ``add_domain`` then trains the reserved domain's
    expert and the routers (two runs). MoLoRA on all the data (general + n + 1 domains) is
    trained from scratch under two budgets, since "fair" depends on what is held equal:

    - ``per-run``: the same steps and batch as every other run (one run's budget);
    - ``per-dataset``: the same steps per dataset as MoDULA's staged training gives each of its
      datasets (steps x the datasets in MoLoRA's mix), so every domain is seen as much as in
      MoDULA (the paper's MoLoRA trains on all the data, one epoch).

    Compared: trainable parameters (what the runs train), tokens and worker-seconds (loop time
    x workers). Target: at most 20 % of MoLoRA's (the paper: 19.8 % of the parameters, 37.3 %
    of the data). Also, Ray-free: the parameter ratio for 2..10 domains (the model's structure;
    the router grows with the domains, an expert does not).

Results: tables on stdout, ``benchmarks/results/training.json`` and ``training.png``.

    .venv/bin/python benchmarks/training.py            # 20 steps a run (~15-20 min, 2 busy cores)
    .venv/bin/python benchmarks/training.py --quick    # 10 steps a run (~13-15 min, 2 busy cores)
    .venv/bin/python benchmarks/training.py --from-json benchmarks/results/training.json  # redraw

The store (default ``runs/bench-training``) keeps the data and the base model between
invocations; its run directories, workspaces and registry are wiped at the start of each run so
that nothing resumes from an earlier invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _k, _v in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
               ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"), ("RAY_DEDUP_LOGS", "0"),
               ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"),
               ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

import yaml  # noqa: E402

from modula.config import ModulaConfig, config_from_dict  # noqa: E402

TARGET = 0.20  # add-domain cost over MoLoRA's, at most (the issue)
PAPER_PARAMS, PAPER_DATA = 0.198, 0.373


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ config


def bench_config(store: Path, steps: int, batch: int, train_rows: int, pretrain_steps: int,
                 num_cpus: int) -> ModulaConfig:
    """configs/default.yaml (tiny model, built-in suite, Res), with the benchmark's budget:
    every adapter stage the same steps and batch, one checkpoint at the end of each run."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["storage"] = {"root": str(store)}
    raw["cluster"] = {**raw.get("cluster", {}), "address": "local", "num_cpus": num_cpus,
                      "num_gpus": 0, "dashboard": False, "namespace": "modula-bench-training"}
    raw["domains"] = [{**d, "splits": {"train": train_rows, "validation": 20, "test": 20}}
                      for d in raw["domains"]]
    stage = {"steps": steps, "batch_size": batch, "lr": 1.0e-3, "warmup_steps": max(1, steps // 10),
             "checkpoint_every": 10**6, "max_failures": 0,
             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    raw["stages"] = {
        **({"pretrain": {"steps": pretrain_steps, "warmup_steps": max(1, pretrain_steps // 10)}}
           if pretrain_steps > 0 else {}),
        **{s: dict(stage) for s in ("universal", "domain", "router", "lora", "molora")},
    }
    return config_from_dict(raw, source="benchmarks/training.py")


def with_new_domain(cfg: ModulaConfig, domain: str, molora_steps: int) -> ModulaConfig:
    """The same config with the reserved domain trained like the others (MoLoRA from scratch)."""
    raw = cfg.model_dump(mode="python")
    raw["domains"] = [{**d, "reserved": False} if d["name"] == domain else d for d in raw["domains"]]
    raw["stages"]["molora"]["steps"] = molora_steps
    return config_from_dict(raw)


def random_base(cfg: ModulaConfig, storage: Any) -> tuple[ModulaConfig, int]:
    """The built-in tiny model, randomly initialised (``build_model``, seeded) with the built-in
    tokenizer, saved once as a Hugging Face folder in the store; the config pointed at it."""
    from modula.basemodel import build_model, builtin_fingerprint, count_parameters
    from modula.data.build import ensure_tokenizer
    from modula.data.tokenizer import load_tokenizer

    tok = load_tokenizer(storage.uri(ensure_tokenizer(cfg, storage)))
    model = build_model(cfg.model.tiny, tok)
    path = Path(storage.uri(f"models/bench-random-{builtin_fingerprint(cfg)[:12]}"))
    if not (path / "config.json").is_file():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    raw = cfg.model_dump(mode="python")
    raw["model"]["base"] = str(path)
    return config_from_dict(raw), count_parameters(model)


def wipe_runs(store: Path) -> None:
    """Nothing of an earlier invocation may resume: run folders, workspaces, registry."""
    for sub in ("runs/train", "work", "registry"):
        shutil.rmtree(store / sub, ignore_errors=True)


def copy_expert(storage: Any, cfg: ModulaConfig, name: str, src_model: str, dst_model: str) -> None:
    """Seed a fresh workspace with an expert trained under another model name (the universal
    expert the Res domain runs build on)."""
    from modula.infra.layout import expert_file, workspace_key

    f = expert_file(name)
    storage.write_bytes(f"{workspace_key(cfg, dst_model)}/{f}",
                        storage.read_bytes(f"{workspace_key(cfg, src_model)}/{f}"))


def summarize(costs: list[Any], wall: float) -> dict[str, Any]:
    tokens = sum(c.tokens for c in costs)
    loop_span = max((c.loop_seconds for c in costs), default=0.0)
    return {
        "runs": [c.to_dict() for c in costs],
        "tokens": tokens,
        "wall_seconds": round(wall, 2),
        "worker_seconds": round(sum(c.worker_seconds for c in costs), 2),
        "trainable_parameters": sum(c.trainable_parameters for c in costs),
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "loop_tokens_per_s_per_run": [c.tokens / c.loop_seconds if c.loop_seconds else 0.0
                                      for c in costs],
        "loop_seconds_sum": round(sum(c.loop_seconds for c in costs), 2),
        "loop_seconds_max": round(loop_span, 2),
    }


# ------------------------------------------------------------------------------------ (a)


def bench_stage2(cfg: ModulaConfig, storage: Any, domains: list[str], universal_from: str
                 ) -> list[dict[str, Any]]:
    """One after another: a wave of one per domain (the cost of the first n of them is the
    sequential cost of n). At once: one wave of the first n domains, for n >= 2 (for n = 1 it is
    the same call as the first sequential one)."""
    from modula.trainers.plan import stage_runs
    from modula.trainers.runner import run_stage

    seq_name = "bench-seq"
    copy_expert(storage, cfg, "universal", universal_from, seq_name)
    seq_costs, seq_walls, seq_loads = [], [], []
    for run in stage_runs(cfg, "domains", domains=domains, name=seq_name):
        seq_loads.append(loadavg())
        t0 = time.time()
        seq_costs += run_stage(cfg, [run], storage, seq_name, show_progress=False)
        seq_walls.append(time.time() - t0)
        log(f"stage 2, one after another: {run.trains[0]} {seq_walls[-1]:.0f}s, "
            f"{seq_costs[-1].tokens:,} tokens")
    rows = []
    for n in range(1, len(domains) + 1):
        row: dict[str, Any] = {"n": n, "domains": domains[:n]}
        row["sequential"] = summarize(seq_costs[:n], sum(seq_walls[:n])) | {
            "loadavg_before": seq_loads[0], "loadavg_after": seq_loads[n] if n < len(seq_loads)
            else loadavg()}
        if n == 1:
            row["concurrent"] = row["sequential"]
        else:
            mname = f"bench-con{n}"
            copy_expert(storage, cfg, "universal", universal_from, mname)
            runs = stage_runs(cfg, "domains", domains=domains[:n], name=mname)
            load_before = loadavg()
            t0 = time.time()
            costs = run_stage(cfg, runs, storage, mname, show_progress=False)
            row["concurrent"] = summarize(costs, time.time() - t0) | {
                "loadavg_before": load_before, "loadavg_after": loadavg()}
        for mode in ("concurrent", "sequential"):
            log(f"stage 2, n={n} {mode}: {row[mode]['tokens']:,} tokens in "
                f"{row[mode]['wall_seconds']:.0f}s = {row[mode]['tokens_per_s']:.0f} tok/s")
        row["speedup"] = row["concurrent"]["tokens_per_s"] / row["sequential"]["tokens_per_s"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ (b)


def bench_add_domain(cfg: ModulaConfig, storage: Any, base_model: str, new_domain: str
                     ) -> dict[str, Any]:
    """The model of `base_model`'s workspace (universal + domain experts) gets its routers and
    is published; then `add_domain`; then MoLoRA from scratch on all data, two budgets."""
    from modula.trainers.plan import stage_runs
    from modula.trainers.runner import add_domain, publish, run_stage

    t0 = time.time()
    router_costs = run_stage(cfg, stage_runs(cfg, "router", name=base_model), storage,
                             base_model, show_progress=False)
    publish(cfg, storage, name=base_model, variant=cfg.modula.variant, costs=router_costs)
    log(f"router stage + publish: {time.time() - t0:.0f}s")

    t0 = time.time()
    version, add_costs = add_domain(cfg, new_domain, storage=storage, name=base_model,
                                    show_progress=False)
    add = summarize(add_costs, time.time() - t0) | {"version": version.version,
                                                     "domains": version.metadata.get("domains")}
    log(f"add-domain {new_domain}: {add['tokens']:,} tokens, {add['worker_seconds']:.0f} "
        f"worker-s, {add['trainable_parameters']:,} params")

    steps = cfg.stages.domain.steps
    molora = {}
    n_datasets = len(stage_runs(with_new_domain(cfg, new_domain, steps), "molora")[0].data)
    for budget, mult in (("per-run", 1), ("per-dataset", n_datasets)):
        mcfg = with_new_domain(cfg, new_domain, steps * mult)
        mname = f"bench-molora-{budget}"
        (run,) = stage_runs(mcfg, "molora", name=mname)
        t0 = time.time()
        costs = run_stage(mcfg, [run], storage, mname, show_progress=False)
        molora[budget] = summarize(costs, time.time() - t0) | {
            "steps": steps * mult, "datasets": list(run.data), "experts": list(run.trains)}
        log(f"MoLoRA from scratch ({budget}, {steps * mult} steps): "
            f"{molora[budget]['tokens']:,} tokens, {molora[budget]['worker_seconds']:.0f} worker-s, "
            f"{molora[budget]['trainable_parameters']:,} params")

    ratios = {}
    for budget, m in molora.items():
        ratios[budget] = {
            "trainable_parameters": add["trainable_parameters"] / m["trainable_parameters"],
            "tokens": add["tokens"] / m["tokens"],
            "worker_seconds": add["worker_seconds"] / m["worker_seconds"],
            "wall_seconds": add["wall_seconds"] / m["wall_seconds"],
        }
    return {"new_domain": new_domain, "old_domains": cfg.expert_domains(),
            "base": {"router_runs": [c.to_dict() for c in router_costs]},
            "add_domain": add, "molora": molora, "ratios": ratios}


def param_ratio_by_domains(cfg: ModulaConfig, storage: Any, max_domains: int = 10
                           ) -> list[dict[str, Any]]:
    """Trainable parameters of adding the k-th domain (one Res expert + the routers of k) over
    MoLoRA with k experts + routers, from the model's structure (no training)."""
    from transformers.utils import logging as hf_logging

    from modula.basemodel import load_base_model
    from modula.model import attach_modula

    hf_logging.disable_progress_bar()
    rows = []
    for k in range(2, max_domains + 1):
        names = [f"d{i}" for i in range(k)]
        counts = {}
        for variant in (cfg.modula.variant, "molora"):
            base, _ = load_base_model(cfg, storage)
            m = attach_modula(base, cfg.modula.model_copy(update={"variant": variant}),
                              domains=names)

            def size(expert: str, m: Any = m) -> int:
                return sum(p.numel() for p in m.expert_parameters(expert))

            if variant == "molora":
                counts["molora"] = sum(size(n) for n in names) + size("routers")
            else:
                counts["add"] = size(names[-1]) + size("routers")
        rows.append({"domains": k, "add_domain": counts["add"], "molora": counts["molora"],
                     "ratio": counts["add"] / counts["molora"]})
    return rows


# ------------------------------------------------------------------------------------ output


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    s = result["settings"]
    t = Table(title=f"(a) stage 2: n domain experts side by side vs one after another "
                    f"({s['steps']} steps x batch {s['batch_size']} each, "
                    f"{s['workers_per_run']} worker of {s['cpus_per_worker']} CPU a run)")
    for col in ("n", "domains", "tokens", "at once: wall s", "tok/s", "loop tok/s a run",
                "in turn: wall s", "tok/s", "loop tok/s a run", "speed-up"):
        t.add_column(col, justify="left" if col == "domains" else "right")
    for r in result["stage2"]:
        c, q = r["concurrent"], r["sequential"]

        def loop_rate(x: dict) -> str:
            rates = x["loop_tokens_per_s_per_run"]
            return f"{sum(rates) / len(rates):.0f}"

        t.add_row(str(r["n"]), ", ".join(r["domains"]), f"{c['tokens']:,}",
                  f"{c['wall_seconds']:.0f}", f"{c['tokens_per_s']:.0f}", loop_rate(c),
                  f"{q['wall_seconds']:.0f}", f"{q['tokens_per_s']:.0f}", loop_rate(q),
                  f"{r['speedup']:.2f}x")
    console.print(t)

    a = result["add_domain"]
    t = Table(title=f"(b) adding {a['new_domain']!r} to a {len(a['old_domains'])}-domain "
                    f"MoDULA-{s['variant'].capitalize()} vs MoLoRA from scratch on all data")
    for col in ("", "runs", "steps", "trainable params", "tokens", "worker-s", "wall s"):
        t.add_column(col, justify="left" if col == "" else "right")
    add = a["add_domain"]
    t.add_row("add-domain (expert + routers)", str(len(add["runs"])),
              str(sum(r["steps"] for r in add["runs"])), f"{add['trainable_parameters']:,}",
              f"{add['tokens']:,}", f"{add['worker_seconds']:.1f}", f"{add['wall_seconds']:.0f}")
    for budget, m in a["molora"].items():
        t.add_row(f"MoLoRA from scratch, {budget} budget", "1", str(m["steps"]),
                  f"{m['trainable_parameters']:,}", f"{m['tokens']:,}",
                  f"{m['worker_seconds']:.1f}", f"{m['wall_seconds']:.0f}")
    for budget, r in a["ratios"].items():
        cells = []
        for k in ("trainable_parameters", "tokens", "worker_seconds", "wall_seconds"):
            v = r[k]
            color = "green" if v <= TARGET else "red"
            cells.append(f"[{color}]{100 * v:.1f} %[/]")
        t.add_row(f"[bold]add-domain / MoLoRA ({budget})", "", "", *cells)
    console.print(t)

    t = Table(title="trainable parameters of adding the k-th domain / MoLoRA with k domains "
                    "(model structure, no training)")
    t.add_column("domains k", justify="right")
    t.add_column("add-domain", justify="right")
    t.add_column("MoLoRA", justify="right")
    t.add_column("ratio", justify="right")
    for r in result["param_ratio_by_domains"]:
        color = "green" if r["ratio"] <= TARGET else "red"
        t.add_row(str(r["domains"]), f"{r['add_domain']:,}", f"{r['molora']:,}",
                  f"[{color}]{100 * r['ratio']:.1f} %[/]")
    console.print(t)
    console.print(f"target: add-domain <= {100 * TARGET:.0f} % of MoLoRA's cost "
                  f"(paper: {100 * PAPER_PARAMS:.1f} % of the parameters, "
                  f"{100 * PAPER_DATA:.1f} % of the data)")
    console.print(f"load average before / after: {s['loadavg_before']} / {s['loadavg_after']}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = result["stage2"]
    ns = [r["n"] for r in rows]
    ax = axes[0]
    ax.plot(ns, [r["concurrent"]["tokens_per_s"] for r in rows], "C0-o", label="at once (one wave)")
    ax.plot(ns, [r["sequential"]["tokens_per_s"] for r in rows], "C1-s", label="one after another")
    ax.set_xticks(ns)
    ax.set_xlabel("domain experts n")
    ax.set_ylabel("tokens/s (end to end)")
    ax.set_ylim(bottom=0)
    ax.set_title("stage 2 throughput")
    ax.legend(fontsize=8)

    ax = axes[1]
    a = result["add_domain"]
    keys = ("trainable_parameters", "tokens", "worker_seconds")
    labels = ("trainable params", "tokens", "worker-s")
    width = 0.38
    for i, (budget, color) in enumerate((("per-run", "C2"), ("per-dataset", "C4"))):
        vals = [100 * a["ratios"][budget][k] for k in keys]
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, color=color, label=f"vs MoLoRA, {budget} budget")
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom",
                    fontsize=7)
    ax.axhline(100 * TARGET, color="k", ls="--", lw=1, label="target 20 %")
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylabel("% of MoLoRA from scratch")
    ax.set_title(f"adding {a['new_domain']!r}")
    ax.legend(fontsize=7)

    ax = axes[2]
    pr = result["param_ratio_by_domains"]
    ax.plot([r["domains"] for r in pr], [100 * r["ratio"] for r in pr], "C3-o",
            label="add-domain / MoLoRA")
    ax.axhline(100 * TARGET, color="k", ls="--", lw=1, label="target 20 %")
    ax.axhline(100 * PAPER_PARAMS, color="C7", ls=":", lw=1, label="paper 19.8 %")
    ax.set_xlabel("domains after adding")
    ax.set_ylabel("% trainable parameters")
    ax.set_ylim(bottom=0)
    ax.set_title("parameter share by number of domains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 steps a run instead of 20")
    ap.add_argument("--steps", type=int, default=None, help="steps of every adapter run")
    ap.add_argument("--batch", type=int, default=8, help="batch size of every adapter run")
    ap.add_argument("--train-rows", type=int, default=400, help="train split size per domain")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="pretrain the built-in base model first (cached by fingerprint); "
                         "0: its random initialisation (the costs do not depend on the weights)")
    ap.add_argument("--num-cpus", type=int, default=6, help="logical CPUs of the local Ray")
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "bench-training",
                    help="storage root of the benchmark (local)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="output directory")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render a saved run")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_tables(saved)
        plot(saved, args.out / "training.png")
        return 0

    import ray

    from modula.data.build import ensure_data
    from modula.infra.connect import ray_init_kwargs
    from modula.infra.storage import Storage
    from modula.trainers.plan import stage_runs
    from modula.trainers.pretrain import run_pretrain
    from modula.trainers.runner import run_stage

    steps = args.steps or (10 if args.quick else 20)
    cfg = bench_config(args.store, steps, args.batch, args.train_rows, args.pretrain_steps,
                       args.num_cpus)
    reserved = [d.name for d in cfg.domains if d.reserved]
    if not reserved:
        raise SystemExit("configs/default.yaml has no reserved domain to add")
    new_domain = reserved[0]
    experts = cfg.expert_domains()
    storage = Storage(cfg.storage)
    wipe_runs(args.store)
    started = time.time()
    load_before = loadavg()
    ray.init(**{**ray_init_kwargs(cfg.cluster), "log_to_driver": False})
    try:
        t0 = time.time()
        if args.pretrain_steps > 0:
            pre = run_pretrain(cfg, storage, show_progress=False)
            base_note = "built-in tiny, pretrained" + (" (cached)" if pre.cached else "")
            base_params = pre.parameters
        else:
            cfg, base_params = random_base(cfg, storage)
            base_note = "built-in tiny architecture, random initialisation"
        log(f"base model ({base_note}): {base_params:,} parameters, {time.time() - t0:.0f}s")
        ensure_data(cfg, storage)  # built before any timing (a first run would pay for it)
        t0 = time.time()
        (uni,) = stage_runs(cfg, "universal", name="bench-universal")
        (uni_cost,) = run_stage(cfg, [uni], storage, "bench-universal", show_progress=False)
        log(f"universal expert: {time.time() - t0:.0f}s")
        stage2 = bench_stage2(cfg, storage, experts, "bench-universal")
        add = bench_add_domain(cfg, storage, f"bench-con{len(experts)}", new_domain)
        by_domains = param_ratio_by_domains(cfg, storage)
    finally:
        ray.shutdown()
    import torch

    result = {
        "settings": {
            "quick": args.quick, "steps": steps, "batch_size": args.batch,
            "train_rows_per_domain": args.train_rows, "pretrain_steps": args.pretrain_steps,
            "max_length": cfg.model.max_length, "lr": cfg.stages.domain.lr,
            "workers_per_run": cfg.stages.domain.scaling.num_workers,
            "cpus_per_worker": cfg.stages.domain.scaling.cpus_per_worker,
            "torch_threads_per_worker": int(cfg.stages.domain.scaling.cpus_per_worker),
            "ray_logical_cpus": args.num_cpus, "physical_cpus": os.cpu_count(),
            "variant": cfg.modula.variant, "universal_rank": cfg.modula.universal_rank,
            "domain_rank": cfg.modula.domain_rank, "base_model": cfg.model.base,
            "tiny": cfg.model.tiny.model_dump(mode="json"),
            "base_parameters": base_params, "base_note": base_note, "domains": experts, "new_domain": new_domain,
            "budget": "every adapter run (universal, each domain, router, add-domain's two, "
                      "MoLoRA per-run) has the same steps and batch; MoLoRA per-dataset has "
                      "steps x the datasets of its mix",
            "tokens": "non-padding tokens of the training batches (prompt + response)",
            "worker_seconds": "training-loop seconds x workers (no Ray start-up)",
            "tokens_per_s": "tokens of the stage's runs / wall time of the stage (data prep, "
                            "Ray Train start-up and loops)",
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "torch": torch.__version__, "ray": ray.__version__, "machine": platform.machine(),
            "wall_s": round(time.time() - started, 1),
        },
        "universal": uni_cost.to_dict(),
        "stage2": stage2,
        "add_domain": add,
        "param_ratio_by_domains": by_domains,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    plot(result, args.out / "training.png")
    print(f"wrote {args.out / 'training.json'} and {args.out / 'training.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
