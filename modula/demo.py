"""`modula demo`: the main job end to end on a config (default: the embedded default).

Validate the config, start Ray, build the data, pretrain (or reuse) the base model, train the
three MoDULA stages, plug in each reserved domain as `modula add-domain` does (its expert and
the routers only, on top of the version just published, the old experts' files untouched),
evaluate the base model and the trained variant, write the report, deploy the Serve application
and query it through the OpenAI API, then shut it down. Every step prints what it does; each is
the same code path as its own command.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import openai
import typer
from ray import serve
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modula.config.loader import load_config
from modula.config.options import ConfigOpt, SetOpt
from modula.config.schema import ModulaConfig
from modula.data.build import ensure_data
from modula.data.io import read_records
from modula.eval.evaluate import DomainResult
from modula.eval.metrics import exact_match
from modula.eval.report import domain_line, render_table, write_report
from modula.eval.run import run_eval
from modula.infra.commands import print_resources
from modula.infra.connect import ray_session
from modula.infra.layout import DATA, published_name
from modula.infra.registry import Registry
from modula.infra.storage import Storage
from modula.serving.deploy import deploy, preflight
from modula.trainers import add_domain, run_pretrain, train

__all__ = ["answers_table", "register", "run_demo", "serve_and_query"]

console = Console()


def run_demo(config: Path | None, sets: list[str] | None) -> None:
    t0 = time.time()
    phases: dict[str, float] = {}
    console.rule("[bold]modula demo")
    cfg = load_config(config, sets)
    console.print(
        f"config valid: variant={cfg.modula.variant}, base={cfg.model.base}, "
        f"experts={cfg.expert_domains()}, storage={cfg.storage.root}"
    )
    storage = Storage(cfg.storage)
    with ray_session(cfg.cluster) as resources:
        print_resources(cfg, resources)
        phases["start Ray"] = time.time() - t0
        mark = time.time()
        console.rule("1. data")
        ensure_data(cfg, storage)
        console.print(f"built-in suite and splits in {storage.uri(DATA)}")
        mark = _phase(phases, "1. data", mark)
        if cfg.model.is_builtin:
            console.rule("2. base model (stage 0)")
            res = run_pretrain(cfg, storage, console=console)
            console.print(f"base model: {res.parameters:,} parameters"
                          + (" (reused)" if res.cached else f", trained in {res.train_seconds:.0f}s"))
            mark = _phase(phases, "2. base model", mark)
        console.rule(f"3. MoDULA-{cfg.modula.variant}: universal -> domain experts -> router")
        costs = train(cfg, "all", storage=storage, console=console)
        console.print(f"{len(costs)} runs, {sum(c.worker_seconds for c in costs):.0f} worker-seconds")
        mark = _phase(phases, "3. three stages", mark)
        if add_reserved(cfg, storage):
            mark = _phase(phases, "3b. add-domain", mark)
        console.rule("4. evaluation")
        results = {}
        for variant in ("base", cfg.modula.variant):
            with console.status(f"evaluating {variant} on {len(cfg.domains)} domains "
                                f"({cfg.eval.max_examples} test examples each)"):
                result, _ = run_eval(cfg, storage, variant=variant, on_domain=_show_domain)
            results[variant] = result
        console.print(render_table(results))
        files = write_report(storage, Path(cfg.eval.output_dir))
        console.print("report: " + ", ".join(str(p) for p in files.values()))
        mark = _phase(phases, "4. evaluation + report", mark)
        console.rule("5. serving")
        serve_and_query(cfg, storage)
        _phase(phases, "5. serve + query", mark)
    phases["total"] = time.time() - t0
    _print_phases(phases)
    console.rule(f"[green]demo finished in {phases['total']:.0f}s")


def add_reserved(cfg: ModulaConfig, storage: Storage) -> list[str]:
    """Plug each reserved domain into the version the stages just published, the way
    `modula add-domain NAME` does, and show that the old experts' files did not change (their
    sha256 in both manifests). Returns the domains added; none for the baselines."""
    if cfg.modula.variant not in ("flan", "res"):
        return []
    added = []
    registry = Registry.from_config(cfg)
    rname = published_name(cfg, cfg.modula.variant)
    trained = set(cfg.expert_domains())
    for name in [d for d in cfg.expert_domains(include_reserved=True) if d not in trained]:
        before = registry.show(rname)
        console.rule(f"3b. add-domain {name}: its expert and the routers only")
        version, costs = add_domain(cfg, name, storage=storage, console=console)
        after = registry.show(rname, version.version)
        kept = [n for n, e in before.experts.items()
                if n in after.experts and after.experts[n].sha256 == e.sha256]
        console.print(f"{rname} v{before.version} -> v{after.version}: + {name}, "
                      f"{sum(c.worker_seconds for c in costs):.0f} worker-seconds; unchanged "
                      f"files: {', '.join(kept)}")
        added.append(name)
    return added


def _show_domain(r: DomainResult) -> None:
    console.print(domain_line(r))


def _phase(phases: dict[str, float], name: str, since: float) -> float:
    now = time.time()
    phases[name] = now - since
    return now


def _print_phases(phases: dict[str, float]) -> None:
    """Where the time went: the first thing to look at when the demo is slower than expected."""
    table = Table(title="demo wall time")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, seconds in phases.items():
        table.add_row(name, f"{seconds:.0f}")
    console.print(table)


QUERIES_PER_CHECKABLE_DOMAIN = 5


def serve_and_query(cfg: ModulaConfig, storage: Storage) -> list[dict[str, Any]]:
    """Deploy the graph `modula serve` deploys, send test prompts of every domain through the
    official OpenAI client (routed as the config routes, never pinned: by the request
    classifier or per token by the gates), print the answers with the gate weights, whether
    they are right (domains scored by exact match get several prompts) and the mean gate on
    the domain's own expert, and shut the application down whatever happens."""
    info = preflight(cfg)
    console.print(f"deploying {info['registry_model']} v{info['version']} "
                  f"({', '.join(info['domains'])}) on {cfg.serve.host}:{cfg.serve.port} ...")
    t0 = time.time()
    try:
        url = deploy(cfg)  # returns once every deployment is healthy
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=3, timeout=120)
        served = [m.id for m in client.models.list().data]
        console.print(f"[green]ready[/] in {time.time() - t0:.0f}s: {url}/v1, models: "
                      + ", ".join(served))
        answers = []
        for domain in info["domains"]:
            checkable = cfg.domain(domain).metric in ("exact_match", "accuracy")
            rows = read_records(storage, domain, "test",
                                QUERIES_PER_CHECKABLE_DOMAIN if checkable else 1)
            replies = []
            for row in rows:
                r = client.chat.completions.create(
                    model=cfg.serve.model_name, temperature=0, max_tokens=48,
                    messages=[{"role": "user", "content": row["prompt"]}])
                ext = (r.model_extra or {}).get("modula", {})
                replies.append((row, r.choices[0].message.content, ext.get("gates") or {},
                                ext.get("classifier") or {}))
            row, answer, gates, probs = replies[0]
            answers.append({
                "domain": domain, "prompt": row["prompt"], "answer": answer,
                "expected": row["response"], "gates": gates, "classifier": probs,
                "right": sum(exact_match(a, x["response"]) for x, a, _, _ in replies)
                if checkable else None,
                "asked": len(replies),
                "own_gate": sum(g.get(domain, 0.0) for _, _, g, _ in replies) / len(replies)})
        how = ("by the request classifier" if cfg.modula.router.granularity == "request"
               else "per token by the gates")
        console.print(answers_table(answers, f"served answers, routed {how}"))
        return answers
    finally:
        with contextlib.suppress(Exception):
            serve.delete(cfg.serve.app_name)
        with contextlib.suppress(Exception):
            serve.shutdown()
        console.print("serve application stopped")


def answers_table(answers: list[dict[str, Any]], title: str) -> Table:
    """One row per domain: the first prompt, its served answer, the expected one, the gate
    weights (and the classifier's top class), then how many answers were right and the mean
    gate on the domain's own expert, one line each, so the table reads at 80 columns."""
    table = Table(title=title)
    table.add_column("domain", style="cyan", no_wrap=True)
    table.add_column("request", overflow="fold")
    for a in answers:
        top = sorted(a["gates"].items(), key=lambda kv: -kv[1])
        lines = [("prompt", _short(a["prompt"])), ("answer", _short(a["answer"])),
                 ("expected", _short(a["expected"])),
                 ("gates", " ".join(f"{k}={v:.2f}" for k, v in top[:4]))]
        probs = a.get("classifier") or {}
        if probs:
            best = max(probs, key=probs.get)
            lines.append(("classifier", f"{best} p={probs[best]:.2f}"))
        asked = a.get("asked", 1)
        score = (f"{a['right']}/{asked} right, " if a.get("right") is not None else "")
        if "own_gate" in a:
            lines.append(("served", f"{score}mean gate on {a['domain']} {a['own_gate']:.2f} "
                                    f"over {asked} prompt(s)"))
        text = Text()
        for i, (label, value) in enumerate(lines):
            text.append(f"{label}: ", style="dim")
            text.append(value + ("\n" if i < len(lines) - 1 else ""))
        table.add_row(a["domain"], text)
    return table


def _short(text: str | None, limit: int = 90) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
        """Run the main job end to end on the config (default: the embedded default)."""
        run_demo(config, set_)
