"""The paper's experiment at small scale (not a test): MoDULA against its baselines, then a domain
added to each.

On the built-in suite and the built-in base model, for every seed:

1. train with equal budgets and evaluate: the base model, a single LoRA on all data mixed,
   MoLoRA (experts and router jointly), MoDULA-Flan, MoDULA-Res. The budget is counted in
   optimizer steps of the same batch size: MoDULA's universal + every domain expert + router
   steps; the single LoRA and MoLoRA get that many steps on all the data mixed;
2. add the reserved domain: MoDULA-Flan and -Res train one expert plus the routers
   (`add_domain`, the code of ``modula add-domain``); MoLoRA retrains from scratch on all data
   with the same per-domain budget; evaluate all three again (old domains before / after).

Every training run goes through the same code as ``modula train`` (Ray Train, one TorchTrainer per
run); every score through ``modula eval``'s code. Results: tables of mean ± std over the seeds on
stdout, ``benchmarks/results/paper.{json,md}`` and ``paper.png``. Each (seed, step) result is
written as it lands under ``--root``, so an interrupted run continues where it stopped.

    .venv/bin/python benchmarks/paper.py --steps 40 --batch-size 8 --examples 30  # the README's: ~16 min a seed, idle 2 cores
    .venv/bin/python benchmarks/paper.py --seeds 0 --steps 20 --examples 10   # a smoke run
    .venv/bin/python benchmarks/paper.py --from-json benchmarks/results/paper.json  # redraw
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()

VARIANTS = ("lora", "molora", "flan", "res")
LABELS = {"base": "base model", "lora": "single LoRA", "molora": "MoLoRA",
          "flan": "MoDULA-Flan", "res": "MoDULA-Res"}


# ------------------------------------------------------------------------------------ runs


def base_config(args: argparse.Namespace) -> Any:
    from modula.config import load_config

    s = args.steps
    sets = [
        f"storage.root={args.root}",
        f"stages.universal.steps={s}", f"stages.domain.steps={s}",
        f"stages.router.steps={max(1, s // 2)}",
        f"eval.max_examples={args.examples}",
    ]
    # the base model and the per-run resources the published results were measured with (the
    # demo's defaults are smaller and give a run alone both cores)
    sets += ["stages.pretrain.steps=400", "stages.pretrain.warmup_steps=40",
             "stages.pretrain.checkpoint_every=100"]
    for stage in ("universal", "domain", "router", "lora", "molora"):
        sets += [f"stages.{stage}.scaling.cpus_per_worker=1",
                 f"stages.{stage}.batch_size={args.batch_size}",
                 f"stages.{stage}.warmup_steps={max(1, s // 10)}",
                 f"stages.{stage}.checkpoint_every={10 * s}"]  # timing: no mid-run checkpoints
    return load_config(ROOT / "configs" / "default.yaml", sets + list(args.set or []))


def variant_config(cfg: Any, variant: str, seed: int, added: bool = False) -> Any:
    """The config of one (variant, seed): its own registry name, the seed in every stage, and
    for the baselines the MoDULA budget (universal + n domains + router steps)."""
    from modula.config import config_from_dict

    raw = cfg.model_dump(mode="json")
    raw["modula"]["variant"] = variant
    raw["serve"]["model_name"] = f"paper-s{seed}-{variant}" + ("-added" if added else "")
    experts = [d for d in cfg.domains if d.name != "general" and (added or not d.reserved)]
    if added:
        raw["domains"] = [{**d, "reserved": False} for d in raw["domains"]]
    st = raw["stages"]
    budget = st["universal"]["steps"] + len(experts) * st["domain"]["steps"] + \
        st["router"]["steps"]
    for name in ("universal", "domain", "router", "lora", "molora"):
        st[name]["seed"] = seed
    for name in ("lora", "molora"):
        st[name]["steps"] = budget
        st[name]["warmup_steps"] = max(1, budget // 10)
        st[name]["checkpoint_every"] = 10 * budget
    return config_from_dict(raw)


def cost_summary(costs: list[Any]) -> dict[str, Any]:
    return {
        "runs": len(costs),
        "trainable_parameters": sum(c.trainable_parameters for c in costs),
        "tokens": sum(c.tokens for c in costs),
        "steps": sum(c.steps for c in costs),
        "worker_seconds": round(sum(c.worker_seconds for c in costs), 1),
        "wall_seconds": round(sum(c.wall_seconds for c in costs), 1),
    }


def scores(result: Any) -> dict[str, Any]:
    return {
        "domain_average": result.domain_average,
        "general_perplexity": result.general_perplexity,
        "domain_perplexity": result.domain_perplexity,
        "domains": {d: (r.score if r.score is not None else r.perplexity)
                    for d, r in result.domains.items()},
        "metrics": {d: r.metric for d, r in result.domains.items()},
        # response perplexity of every domain: at small budgets the exact-match scores sit at
        # the floor and this is where the variants differ
        "perplexities": {d: r.perplexity for d, r in result.domains.items()},
    }


def journal_name(args: argparse.Namespace) -> str:
    import hashlib

    extra = "\n".join(sorted(args.set or []))
    return f"steps{args.steps}-batch{args.batch_size}-examples{args.examples}" + (
        f"-{hashlib.sha256(extra.encode()).hexdigest()[:8]}" if extra else "")


class Journal:
    """One JSON file per finished step under ``<root>/paper/<settings>``: a rerun with the same
    settings skips what is done; other settings start their own journal."""

    def __init__(self, root: Path, settings: str):
        self.dir = root / "paper" / settings
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.dir / f"{key}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        (self.dir / f"{key}.json").write_text(json.dumps(value, indent=1))
        return value

    def all(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from modula.basemodel import load_base_model
    from modula.data.build import ensure_data
    from modula.eval.run import run_eval
    from modula.infra.connect import ray_session
    from modula.infra.layout import published_name
    from modula.infra.registry import Registry
    from modula.infra.storage import Storage
    from modula.model import load_modula
    from modula.trainers.pretrain import run_pretrain
    from modula.trainers.runner import add_domain, train

    cfg = base_config(args)
    storage = Storage(cfg.storage)
    registry = Registry(storage)
    journal = Journal(Path(args.root), journal_name(args))
    reserved = [d.name for d in cfg.domains if d.reserved]
    if len(reserved) != 1:
        raise SystemExit(f"the experiment needs exactly one reserved domain, got {reserved}")
    new_domain = reserved[0]
    t0 = time.time()

    def evaluate(vcfg: Any, variant: str, without: str | None = None) -> dict[str, Any]:
        """Scores of the model `vcfg` publishes: its latest version, or (``without``) the
        latest one that does not yet have that expert (a model before the addition)."""
        if variant == "base":
            result, _ = run_eval(vcfg, storage, variant="base", save=False, gates=False)
            return scores(result)
        name = published_name(vcfg, variant)
        version = registry.latest_version(name)
        while without and version and without in registry.show(name, version).experts:
            version -= 1
        if not version:
            raise SystemExit(f"{name}: no published version to evaluate"
                             + (f" without {without!r}" if without else ""))
        base_model, tok = load_base_model(vcfg, storage)
        local = registry.fetch(name, version, dest=Path(tempfile.mkdtemp(prefix="paper-eval-")))
        try:
            model = load_modula(base_model, local.path).eval()
            result, _ = run_eval(vcfg, storage, variant=variant, model=model, tokenizer=tok,
                                 save=False, gates=False, model_name=f"{name}@v{version}")
        finally:
            shutil.rmtree(local.path, ignore_errors=True)
        return {**scores(result), "model": name, "version": version}

    with ray_session(cfg.cluster):
        ensure_data(cfg, storage)
        base = run_pretrain(cfg, storage, console=console)
        console.print(f"base model: {base.parameters:,} parameters"
                      + (" (reused)" if base.cached else f", pretrained in {base.train_seconds:.0f}s"))
        if journal.get("base") is None:
            all_cfg = variant_config(cfg, "res", 0, added=True)
            journal.put("base", {"scores": evaluate(all_cfg, "base")})
        for seed in args.seeds:
            for variant in VARIANTS:
                key = f"s{seed}-{variant}"
                if journal.get(key) is None:
                    console.rule(f"seed {seed}: {LABELS[variant]}")
                    vcfg = variant_config(cfg, variant, seed)
                    t = time.time()
                    costs = train(vcfg, "all", storage=storage, console=console,
                                  show_progress=not args.quiet)
                    journal.put(key, {"seed": seed, "variant": variant, "cost": cost_summary(costs),
                                      "train_seconds": round(time.time() - t, 1),
                                      "scores": evaluate(vcfg, variant, without=new_domain)})
                key_add = f"s{seed}-{variant}-added"
                if variant == "lora" or journal.get(key_add) is not None:
                    continue
                console.rule(f"seed {seed}: {LABELS[variant]} + {new_domain}")
                t = time.time()
                if variant == "molora":  # the baseline has no other way: retrain from scratch
                    acfg = variant_config(cfg, variant, seed, added=True)
                    costs = train(acfg, "all", storage=storage, console=console,
                                  show_progress=not args.quiet)
                else:
                    vcfg = variant_config(cfg, variant, seed)
                    _, costs = add_domain(vcfg, new_domain, storage=storage, console=console,
                                          show_progress=not args.quiet)
                    acfg = variant_config(cfg, variant, seed, added=True)
                    acfg = _published_as(acfg, vcfg)
                journal.put(key_add, {"seed": seed, "variant": variant,
                                      "cost": cost_summary(costs),
                                      "train_seconds": round(time.time() - t, 1),
                                      "scores": evaluate(acfg, variant)})
        # entries written before the journal kept per-domain perplexities: score them again
        # from the registry (the same published versions, so the other scores do not change)
        stale = [k for k, e in journal.all().items() if "perplexities" not in e["scores"]]
        for key in stale:
            console.rule(f"re-scoring {key} (per-domain perplexities)")
            entry = journal.get(key)
            if key == "base":
                entry["scores"] = evaluate(variant_config(cfg, "res", 0, added=True), "base")
            else:
                seed, variant = int(entry["seed"]), entry["variant"]
                added = key.endswith("-added")
                vcfg = variant_config(cfg, variant, seed, added=added)
                if added and variant != "molora":
                    vcfg = _published_as(vcfg, variant_config(cfg, variant, seed))
                entry["scores"] = evaluate(vcfg, variant,
                                           without=None if added else new_domain)
            journal.put(key, entry)
    data = summarize(journal.all(), new_domain)
    data["settings"] = {
        "seeds": args.seeds, "steps": args.steps, "router_steps": max(1, args.steps // 2),
        "batch_size": args.batch_size, "eval_examples_per_domain": args.examples,
        "base_parameters": base.parameters, "new_domain": new_domain,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                   f"{_cpus()} cores, no GPU",
        "seconds": round(time.time() - t0, 1),
    }
    return data


def _published_as(cfg: Any, other: Any) -> Any:
    """`cfg` under `other`'s registry name (a domain added to a model publishes a new version of
    that model)."""
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(
        update={"model_name": other.serve.model_name})})


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


# ------------------------------------------------------------------------------- summary


def _ms(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "n": len(v)}


def summarize(entries: dict[str, dict[str, Any]], new_domain: str) -> dict[str, Any]:
    """Mean and spread over the seeds of every score and cost."""
    base = entries["base"]["scores"]
    rows: dict[str, Any] = {"base": {"scores": {k: {"mean": v, "std": 0.0, "n": 1}
                                                for k, v in _flat(base, new_domain).items()}}}
    for variant in VARIANTS:
        for suffix in ("", "-added"):
            runs = [e for k, e in entries.items()
                    if k.startswith("s") and k.endswith(f"-{variant}{suffix}")
                    and (suffix or not k.endswith("-added"))]
            if not runs:
                continue
            flat = [_flat(r["scores"], new_domain) for r in runs]
            keys = sorted({k for f in flat for k in f})
            rows[variant + suffix] = {
                "seeds": sorted(r["seed"] for r in runs),
                "scores": {k: _ms([f.get(k) for f in flat]) for k in keys},
                "cost": {k: _ms([r["cost"][k] for r in runs]) for k in runs[0]["cost"]},
            }
    # the cost of adding the domain, relative to MoLoRA retrained from scratch (same seed)
    ratios: dict[str, Any] = {}
    for variant in ("flan", "res"):
        per_seed = []
        for k, e in entries.items():
            if k.endswith(f"-{variant}-added"):
                ref = entries.get(f"s{e['seed']}-molora-added")
                if ref:
                    per_seed.append({m: e["cost"][m] / ref["cost"][m] for m in
                                     ("worker_seconds", "trainable_parameters", "tokens")
                                     if ref["cost"][m]})
        if per_seed:
            ratios[variant] = {m: _ms([p.get(m) for p in per_seed]) for m in per_seed[0]}
    # the old domains' scores before and after the addition, per seed
    drift: dict[str, Any] = {}
    ppl_drift: dict[str, Any] = {}
    for variant in ("molora", "flan", "res"):
        deltas: dict[str, list[float]] = {}
        rel: dict[str, list[float]] = {}
        for k, e in entries.items():
            if k.endswith(f"-{variant}-added"):
                before = entries.get(f"s{e['seed']}-{variant}")
                if not before:
                    continue
                for d, v in before["scores"]["domains"].items():
                    after = e["scores"]["domains"].get(d)
                    if d != new_domain and v is not None and after is not None:
                        deltas.setdefault(d, []).append(after - v)
                for d, v in (before["scores"].get("perplexities") or {}).items():
                    after = (e["scores"].get("perplexities") or {}).get(d)
                    if d != new_domain and v and after:
                        rel.setdefault(d, []).append(100 * (after / v - 1))
        if deltas:
            drift[variant] = {d: _ms(v) for d, v in deltas.items()}
        if rel:
            ppl_drift[variant] = {d: _ms(v) for d, v in rel.items()}
    return {"rows": rows, "add_cost_vs_molora_retrain": ratios, "old_domain_change": drift,
            "old_domain_perplexity_change_pct": ppl_drift,
            "metrics": base["metrics"], "new_domain": new_domain}


def _flat(s: dict[str, Any], new_domain: str) -> dict[str, float | None]:
    """The scores of one evaluation; ``domain_average`` is over the scored (non-perplexity)
    domains that every row has an expert for, the new one left out, so rows compare."""
    old = [v for d, v in s["domains"].items()
           if d not in ("general", new_domain) and s["metrics"][d] != "perplexity"
           and v is not None]
    ppl = s.get("perplexities") or {}
    old_ppl = [v for d, v in ppl.items() if d not in ("general", new_domain) and v]
    out = {"domain_average": statistics.fmean(old) if old else None,
           "general_perplexity": s["general_perplexity"],
           "domain_perplexity": s["domain_perplexity"],
           "old_domain_perplexity": statistics.geometric_mean(old_ppl) if old_ppl else None}
    out.update({f"domain:{d}": v for d, v in s["domains"].items()})
    out.update({f"ppl:{d}": v for d, v in ppl.items()})
    return out


def _fmt(m: dict[str, Any] | None, digits: int = 1) -> str:
    if not m or m.get("mean") is None:
        return "-"
    if m.get("n", 1) > 1:
        return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"
    return f"{m['mean']:.{digits}f}"


def tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the three result tables, for the terminal and Markdown."""
    rows = data["rows"]
    metrics = data["metrics"]
    domains = [d for d in metrics if d != "general"]
    unit = {"perplexity": "ppl ↓", "exact_match": "EM % ↑", "accuracy": "acc % ↑"}
    out = []
    header = ["model", "old-domain avg (score %) ↑", *(f"{d} ({unit[metrics[d]]})" for d in domains),
              "general (ppl ↓)"]
    body = []
    for name, label in _row_labels(data):
        s = rows[name]["scores"]
        body.append([label, _fmt(s.get("domain_average")),
                     *(_fmt(s.get(f"domain:{d}"), 1) for d in domains),
                     _fmt(s.get("general_perplexity"))])
    out.append(("Scores (mean ± std over seeds; test split)", header, body))

    old = [d for d in domains if d != data["new_domain"]]
    header = ["model", f"old domains ({', '.join(old)}), geo-mean", *domains, "general"]
    body = []
    for name, label in _row_labels(data):
        s = rows[name]["scores"]
        if s.get("old_domain_perplexity", {}).get("mean") is None:
            continue
        body.append([label, _fmt(s.get("old_domain_perplexity")),
                     *(_fmt(s.get(f"ppl:{d}")) for d in domains),
                     _fmt(s.get("general_perplexity"))])
    if body:
        out.append(("Response perplexity per domain (↓; prompt tokens masked; mean ± std)",
                    header, body))

    header = ["adding " + data["new_domain"], "runs", "trainable parameters", "tokens",
              "worker-seconds", "vs MoLoRA retrain (params / worker-s / tokens)"]
    body = []
    for v in ("molora", "flan", "res"):
        r = rows.get(f"{v}-added")
        if not r:
            continue
        c = r["cost"]
        ratio = data["add_cost_vs_molora_retrain"].get(v)
        rs = ("1 (retrain from scratch)" if v == "molora" else
              " / ".join(f"{100 * ratio[m]['mean']:.1f} %" for m in
                         ("trainable_parameters", "worker_seconds", "tokens")) if ratio else "-")
        body.append([LABELS[v], _fmt(c["runs"], 0), _fmt(c["trainable_parameters"], 0),
                     _fmt(c["tokens"], 0), _fmt(c["worker_seconds"], 0), rs])
    out.append(("Cost of adding the domain", header, body))

    old = [d for d in domains if d != data["new_domain"]]
    header = ["score change after adding " + data["new_domain"], *old]
    body = [[LABELS[v], *(_fmt(data["old_domain_change"][v].get(d), 2) for d in old)]
            for v in ("molora", "flan", "res") if v in data["old_domain_change"]]
    out.append(("Old domains before → after (after − before; ppl for code)", header, body))
    change = data.get("old_domain_perplexity_change_pct") or {}
    if change:
        header = ["response perplexity change after adding " + data["new_domain"] + " (%)", *old]
        body = [[LABELS[v], *(_fmt(change[v].get(d), 2) for d in old)]
                for v in ("molora", "flan", "res") if v in change]
        out.append(("Old domains' response perplexity, after / before − 1 (%)", header, body))
    return out


def _row_labels(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(row key, label) of every model in the results, in table order."""
    names = [("base", LABELS["base"]), *((v, LABELS[v]) for v in VARIANTS),
             *((f"{v}-added", f"{LABELS[v]} + {data['new_domain']}")
               for v in ("molora", "flan", "res"))]
    return [(n, label) for n, label in names if n in data["rows"]]


def print_tables(data: dict[str, Any]) -> None:
    for title, header, body in tables(data):
        t = Table(title=title)
        for h in header:
            t.add_column(h, overflow="fold")
        for row in body:
            t.add_row(*row)
        console.print(t)


def to_markdown(data: dict[str, Any]) -> str:
    parts = []
    for title, header, body in tables(data):
        parts.append(f"**{title}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(r) + " |" for r in body]
        parts.append("")
    s = data.get("settings", {})
    if s:
        parts.append(f"Settings: seeds {s.get('seeds')}, {s.get('steps')} steps per universal / "
                     f"domain stage, {s.get('router_steps')} router steps, batch "
                     f"{s.get('batch_size')}, {s.get('eval_examples_per_domain')} test examples "
                     f"per domain, base model {s.get('base_parameters'):,} parameters; "
                     f"{s.get('machine')}; {s.get('seconds')} s in all.")
    return "\n".join(parts) + "\n"


def plot(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = [n for n in ("base", *VARIANTS) if n in rows]
    colors = ["#999", "#6a9fd4", "#e49b4b", "#7cbf7c", "#c25b5b"][: len(names)]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    ax = axes[0]
    means = [rows[n]["scores"]["domain_average"]["mean"] or 0 for n in names]
    stds = [rows[n]["scores"]["domain_average"]["std"] or 0 for n in names]
    ax.bar([LABELS[n] for n in names], means, yerr=stds, capsize=4, color=colors)
    ax.set_title("domain average (score %), mean ± std")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[1]
    old = [rows[n]["scores"].get("old_domain_perplexity") or {} for n in names]
    ax.bar([LABELS[n] for n in names], [o.get("mean") or 0 for o in old],
           yerr=[o.get("std") or 0 for o in old], capsize=4, color=colors)
    ax.set_yscale("log")
    ax.set_title("old domains: response perplexity, geo-mean (lower is better)")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[2]
    gp = [rows[n]["scores"]["general_perplexity"]["mean"] or 0 for n in names]
    gs = [rows[n]["scores"]["general_perplexity"]["std"] or 0 for n in names]
    ax.bar([LABELS[n] for n in names], gp, yerr=gs, capsize=4, color="#8888cc")
    ax.set_title("general ability: held-out perplexity (lower is better)")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[3]
    added = [v for v in ("molora", "flan", "res") if f"{v}-added" in rows]
    ws = [rows[f"{v}-added"]["cost"]["worker_seconds"]["mean"] for v in added]
    tp = [rows[f"{v}-added"]["cost"]["trainable_parameters"]["mean"] for v in added]
    if added:
        x = range(len(added))
        ax.bar([i - 0.2 for i in x], [w / ws[0] * 100 for w in ws], 0.4, label="worker-seconds")
        ax.bar([i + 0.2 for i in x], [p / tp[0] * 100 for p in tp], 0.4,
               label="trainable parameters")
        ax.set_xticks(list(x), [LABELS[v] for v in added])
        ax.axhline(20, color="k", ls=":", lw=1, label="20 % (paper: 19.8 %)")
        ax.legend(fontsize=8)
    ax.set_title(f"cost of adding {data['new_domain']} (% of MoLoRA retrain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--steps", type=int, default=60,
                    help="steps of the universal stage and of each domain expert (router: half)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=40, help="test examples per domain")
    ap.add_argument("--root", default=str(ROOT / "runs"),
                    help="storage root (default: the demo's, whose base model is reused)")
    ap.add_argument("--set", action="append", help="a config override, as `modula --set`")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--from-json", type=Path, help="redraw tables and plot from a results JSON")
    ap.add_argument("--quiet", action="store_true", help="no live progress bars")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        data = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "paper.json").write_text(json.dumps(data, indent=2))
    print_tables(data)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper.md").write_text("# The paper's experiment, small scale\n\n" + to_markdown(data))
    console.print(f"wrote {plot(data, args.out / 'paper.png')}, {args.out / 'paper.md'}")


if __name__ == "__main__":
    main()
