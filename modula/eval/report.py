"""The comparison across variants: stored results, the table (terminal, JSON, Markdown) and PNGs.

Each evaluated model's :class:`~modula.eval.evaluate.VariantResult` is stored as
``reports/eval/<variant>.json`` (its gate shares, when it has routers, as
``reports/eval/<variant>.gates.json``). ``modula report`` reads them all and writes
``comparison.json``, ``comparison.md``, ``domains.png`` and ``gates-<variant>.png`` to
``eval.output_dir`` locally and under ``reports/`` in storage.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from modula.errors import ModulaError
from modula.eval.evaluate import DomainResult, GateShares, VariantResult
from modula.infra.layout import EVAL_RESULTS, REPORTS, SERVED_NAME_RE
from modula.infra.storage import Storage

__all__ = [
    "domain_line",
    "VARIANT_ORDER",
    "VARIANT_LABELS",
    "EvalError",
    "ResultsMissing",
    "save_result",
    "load_results",
    "save_gate_shares",
    "load_gate_shares",
    "comparison",
    "render_table",
    "to_markdown",
    "plot_domain_bars",
    "plot_gate_heatmaps",
    "block_shares",
    "write_report",
]

VARIANT_ORDER = ("base", "lora", "molora", "flan", "res")
VARIANT_LABELS = {
    "base": "base model",
    "lora": "LoRA (one adapter, all data)",
    "molora": "MoLoRA (joint)",
    "flan": "MoDULA-Flan",
    "res": "MoDULA-Res",
}


class EvalError(ModulaError, ValueError):
    """An evaluation that cannot be stored or run as asked (a bad row name, no tokenizer)."""


class ResultsMissing(ModulaError, FileNotFoundError):
    """No stored evaluation results to report on."""


def _check_name(variant: str) -> str:
    if not SERVED_NAME_RE.match(variant):
        raise EvalError(f"{variant!r} is not a usable variant name (letters, digits, '.', '_', '-')")
    return variant


def save_result(storage: Storage, result: VariantResult) -> str:
    key = f"{EVAL_RESULTS}/{_check_name(result.variant)}.json"
    storage.write_text(key, json.dumps(result.to_dict(), indent=2))
    return key


def save_gate_shares(storage: Storage, variant: str, gates: GateShares) -> str:
    key = f"{EVAL_RESULTS}/{_check_name(variant)}.gates.json"
    storage.write_text(key, json.dumps(gates.to_dict()))
    return key


def load_results(storage: Storage) -> dict[str, VariantResult]:
    """Every stored variant result, in the order base, lora, molora, flan, res, then others."""
    found: dict[str, VariantResult] = {}
    for key in storage.list(EVAL_RESULTS):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.endswith(".gates.json"):
            r = VariantResult.from_dict(json.loads(storage.read_text(key)))
            found[r.variant] = r
    order = [v for v in VARIANT_ORDER if v in found] + sorted(set(found) - set(VARIANT_ORDER))
    return {v: found[v] for v in order}


def load_gate_shares(storage: Storage) -> dict[str, GateShares]:
    out = {}
    for key in storage.list(EVAL_RESULTS):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".gates.json"):
            out[name[: -len(".gates.json")]] = GateShares.from_dict(json.loads(storage.read_text(key)))
    return out


# --------------------------------------------------------------------------------------------
# the table


def _fmt(v: float | None, kind: str) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "–"
    return f"{v:.1f}" if kind == "score" else f"{v:.2f}"


def comparison(results: dict[str, VariantResult]) -> dict[str, Any]:
    """The table as data: columns (domain, metric) and one row per variant."""
    domains: list[tuple[str, str]] = []
    for r in results.values():
        for name, d in r.domains.items():
            if name != "general" and (name, d.metric) not in domains:
                domains.append((name, d.metric))
    rows = []
    for v, r in results.items():
        cells = {}
        for name, metric in domains:
            d = r.domains.get(name)
            if d is None:
                cells[name] = None
            else:
                cells[name] = d.score if metric in ("exact_match", "accuracy") else d.perplexity
        rows.append({
            "variant": v,
            "label": VARIANT_LABELS.get(v, v),
            "domains": cells,
            "domain_average": r.domain_average,
            "domain_perplexity": r.domain_perplexity,
            "general_perplexity": r.general_perplexity,
        })
    return {
        "columns": [{"domain": n, "metric": m,
                     "unit": "%" if m in ("exact_match", "accuracy") else "ppl"} for n, m in domains],
        "rows": rows,
        "notes": ("domain scores: exact match or accuracy in % (higher is better); ppl: response "
                  "perplexity (lower is better); average = mean score over scored domains; "
                  "general ppl = held-out general perplexity (general ability)"),
    }


def _header(col: dict[str, str]) -> str:
    short = {"exact_match": "EM %", "accuracy": "acc %", "perplexity": "ppl"}[col["metric"]]
    return f"{col['domain']} ({short})"


def _row_cells(table: dict[str, Any], row: dict[str, Any]) -> list[str]:
    cells = [_fmt(row["domains"][c["domain"]], "score" if c["unit"] == "%" else "ppl")
             for c in table["columns"]]
    return cells + [_fmt(row["domain_average"], "score"), _fmt(row["domain_perplexity"], "ppl"),
                    _fmt(row["general_perplexity"], "ppl")]


_TAIL = ["average %", "domain ppl", "general ppl"]


def domain_line(r: DomainResult) -> str:
    """One evaluated domain as a progress line."""
    return (f"  {r.domain:<10} {r.metric:<12} n={r.n:<4} ppl={r.perplexity:8.2f}"
            + (f"  score={r.score:5.1f}%" if r.score is not None else ""))


def render_table(results: dict[str, VariantResult], title: str = "MoDULA comparison") -> Table:
    """The comparison for a terminal: one row per measure, one column per variant (a variant's
    row of the Markdown table is a column here), each column as wide as its longest word, so
    five variants fit 80 columns."""
    data = comparison(results)
    t = Table(title=title, caption=data["notes"], caption_justify="left")
    t.add_column("", style="cyan")
    cells = [_row_cells(data, row) for row in data["rows"]]
    for row, col in zip(data["rows"], cells, strict=True):
        width = max(len(w) for w in [*row["label"].split(), *col])
        t.add_column(row["label"], justify="right", width=width)
    for i, h in enumerate([_header(c) for c in data["columns"]] + _TAIL):
        t.add_row(h, *(c[i] for c in cells), style="bold" if h == "average %" else None)
    return t


def to_markdown(results: dict[str, VariantResult]) -> str:
    data = comparison(results)
    head = ["variant"] + [_header(c) for c in data["columns"]] + _TAIL
    lines = ["| " + " | ".join(head) + " |",
             "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for row in data["rows"]:
        lines.append("| " + " | ".join([row["label"], *_row_cells(data, row)]) + " |")
    return "\n".join(lines) + f"\n\n{data['notes']}.\n"


# --------------------------------------------------------------------------------------------
# pictures


def plot_domain_bars(results: dict[str, VariantResult], path: str | Path) -> Path:
    """Grouped bars: scored domains (%, left) and perplexity domains incl. general (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results)
    scored: list[str] = []
    ppl: list[str] = []
    for r in results.values():
        for name, d in r.domains.items():
            target = scored if d.metric in ("exact_match", "accuracy") else ppl
            if name not in target:
                target.append(name)
    panels = [(scored, "score (%)", lambda d: d.score), (ppl, "response perplexity", lambda d: d.perplexity)]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, (names, ylabel, get) in zip(axes[0], panels, strict=True):
        x = np.arange(len(names))
        for i, v in enumerate(variants):
            vals = []
            for n in names:
                d = results[v].domains.get(n)
                val = get(d) if d is not None else None
                vals.append(np.nan if val is None else val)
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=VARIANT_LABELS.get(v, v))
        ax.set_xticks(x, names)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if "perplexity" in ylabel:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("per-domain results by variant")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_BLOCK = re.compile(r"(?:layers|layer|h|blocks|block)\.(\d+)\.")


def block_shares(gates: GateShares) -> GateShares:
    """Average the routers of one transformer block (q, k, v, o, gate, up, down ...) together,
    so the picture has one panel per layer; names without a block number stay as they are."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(gates.layers):
        m = _BLOCK.search(name + ".")
        groups.setdefault(f"layer {m.group(1)}" if m else name, []).append(i)
    names = list(groups)
    arr = np.stack([gates.shares[idx].mean(0) for idx in groups.values()])
    return GateShares(names, gates.domains, gates.experts, arr)


def plot_gate_heatmaps(shares: np.ndarray, layers: list[str], domains: list[str],
                       experts: list[str], path: str | Path, title: str = "router gates") -> Path:
    """One heatmap per layer: rows = domains, columns = experts, cell = share of the domain's
    tokens' gate weight that goes to the expert (``shares``: [layers, domains, experts])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.asarray(shares, dtype=float)
    if shares.shape != (len(layers), len(domains), len(experts)):
        raise ValueError(f"shares has shape {shares.shape}, expected "
                         f"({len(layers)}, {len(domains)}, {len(experts)})")
    n = len(layers)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.3 * rows + 0.6), squeeze=False)
    fig.subplots_adjust(hspace=0.75, wspace=0.15)
    vmax = float(shares.max()) if shares.size else 1.0
    im = None
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.axis("off")
            continue
        im = ax.imshow(shares[k], vmin=0.0, vmax=max(vmax, 1e-9), cmap="viridis", aspect="auto")
        ax.set_title(layers[k], fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        if k % cols == 0:  # domain names once per row of panels
            ax.set_yticks(range(len(domains)), domains, fontsize=7)
            ax.set_ylabel("tokens of domain", fontsize=8)
        else:
            ax.set_yticks(range(len(domains)), [""] * len(domains))
        for i in range(len(domains)):
            for j in range(len(experts)):
                v = shares[k, i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * vmax else "black")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of tokens' gate weight")
    fig.suptitle(title, y=1.0)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def write_report(storage: Storage, out_dir: str | Path, results: dict[str, VariantResult] | None = None,
                 gates: dict[str, GateShares] | None = None) -> dict[str, Path]:
    """Write comparison.json/.md, domains.png and gates-<variant>.png locally, copies in storage."""
    results = load_results(storage) if results is None else results
    gates = load_gate_shares(storage) if gates is None else gates
    if not results:
        raise ResultsMissing(
            f"no evaluation results under {storage.uri(EVAL_RESULTS)}: run `modula eval` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    data = comparison(results)
    data["results"] = {v: r.to_dict() for v, r in results.items()}
    files["json"] = out / "comparison.json"
    files["json"].write_text(json.dumps(data, indent=2))
    files["markdown"] = out / "comparison.md"
    files["markdown"].write_text("# MoDULA comparison\n\n" + to_markdown(results))
    files["bars"] = plot_domain_bars(results, out / "domains.png")
    for v, g in gates.items():
        b = block_shares(g)
        files[f"gates-{v}"] = plot_gate_heatmaps(
            b.shares, b.layers, b.domains, b.experts, out / f"gates-{v}.png",
            title=f"{VARIANT_LABELS.get(v, v)}: share of each domain's tokens per expert")
    for p in files.values():
        storage.upload_file(p, f"{REPORTS}/{p.name}")
    return files
