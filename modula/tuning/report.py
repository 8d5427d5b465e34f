"""What a sweep leaves behind: the ranked table (terminal, CSV, Markdown), a PNG of the metric
against the main hyperparameters, and the best trial as a ready-to-use config file."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from modula.config.loader import apply_overrides, config_from_dict, load_config
from modula.config.schema import ModulaConfig
from modula.config.tuning import tune_section, tune_target
from modula.tuning.results import SweepResult
from modula.tuning.space import coerce_value

__all__ = ["write_outputs", "results_table", "best_config_text", "plot_sweep"]

MAX_PLOTTED = 4


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _param_keys(result: SweepResult) -> list[str]:
    return sorted({k for t in result.trials for k in t.params})


def _rows(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    keys = _param_keys(result)
    head = ["rank", "trial", "status", *keys, result.metric, "steps", "reports", "starts",
            "wall s"]
    rows = [[str(t.rank), t.trial_id, t.status, *(_fmt(t.params.get(k)) for k in keys),
             _fmt(t.metric), f"{t.steps_done}/{t.steps}", str(t.reports), str(t.starts),
             _fmt(t.wall_seconds)] for t in result.trials]
    return head, rows


def results_table(result: SweepResult) -> Table:
    """The ranked trials for a terminal: the sampled values in one column, so the table fits
    80 columns (report counts and restarts are in the CSV and Markdown)."""
    best = f", best {result.best.trial_id}" if result.best else ""
    t = Table(title=f"sweep {result.name} ({result.stage}): {result.metric}, "
                    f"{'lower' if result.mode == 'min' else 'higher'} is better{best}")
    t.add_column("#", justify="right", no_wrap=True)  # the rank
    t.add_column("trial", no_wrap=True)
    t.add_column("status", min_width=len("finished"))
    t.add_column("values", no_wrap=True)
    for h in ("metric", "steps", "wall s"):  # the metric's name is in the title
        t.add_column(h, justify="right", no_wrap=True)
    for trial in result.trials:
        style = "bold green" if result.best and trial.trial_id == result.best.trial_id else (
            "dim" if trial.status != "finished" else None)
        values = "\n".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.params.items()))
        t.add_row(str(trial.rank), trial.trial_id, trial.status, values, _fmt(trial.metric),
                  f"{trial.steps_done}/{trial.steps}", _fmt(trial.wall_seconds), style=style)
    return t


def _write_csv(result: SweepResult, path: Path) -> None:
    keys = _param_keys(result)
    metric_keys = sorted({k for t in result.trials for k in t.metrics} - {result.metric})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial_id", "status", *keys, result.metric, *metric_keys,
                    "steps_done", "steps", "reports", "starts", "wall_seconds",
                    "trainable_parameters", "run", "error"])
        for t in result.trials:
            w.writerow([t.rank, t.trial_id, t.status, *(t.params.get(k) for k in keys),
                        "" if t.metric is None else t.metric,
                        *(t.metrics.get(k, "") for k in metric_keys), t.steps_done, t.steps,
                        t.reports, t.starts, "" if t.wall_seconds is None else t.wall_seconds,
                        t.trainable_parameters or "", t.run_name or "", t.error or ""])


def _write_markdown(result: SweepResult, path: Path, files: dict[str, Path]) -> None:
    head, rows = _rows(result)
    lines = [f"# Sweep `{result.name}`", "",
             f"Stage `{result.stage}`; trials ranked by `{result.metric}` "
             f"({'lower' if result.mode == 'min' else 'higher'} is better; finished trials "
             "first, then those stopped early by the scheduler). Experiment: "
             f"`{result.path}`.", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| " + " | ".join("---" for _ in head) + " |")
    for r in rows:
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    lines.append("")
    if result.best:
        vals = ", ".join(f"`{k}={_fmt(v)}`" for k, v in result.best.params.items())
        lines.append(f"Best: trial `{result.best.trial_id}` ({vals}), "
                     f"{result.metric} = {_fmt(result.best.metric)}.")
    if "best_config" in files:
        lines.append(f"Config: `{files['best_config'].name}` "
                     f"(`modula train --config {files['best_config'].name}`).")
    if "plot" in files:
        lines += ["", f"![metric against the hyperparameters]({files['plot'].name})"]
    path.write_text("\n".join(lines) + "\n")


def plot_sweep(result: SweepResult, path: Path, cfg: ModulaConfig | None = None) -> Path | None:
    """Metric against each of the (at most four) swept hyperparameters; log axes for log
    distributions; finished trials filled, stopped ones hollow, the best one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _param_keys(result)[:MAX_PLOTTED]
    pts = [t for t in result.trials if t.metric is not None]
    if not keys or not pts:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    space = cfg.tune.space if cfg else {}
    for ax, key in zip(axes[0], keys, strict=False):
        xs = [t.params.get(key) for t in pts]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            pos = [float(x) for x in xs]
            dim = space.get(key)
            if min(pos) > 0 and ((dim is not None and "log" in dim.type)
                                 or max(pos) / min(pos) >= 20):
                ax.set_xscale("log")
        else:
            cats = sorted({str(x) for x in xs})
            pos = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        for t, x in zip(pts, pos, strict=True):
            done = t.status == "finished"
            ax.scatter([x], [t.metric], s=46, marker="o",
                       facecolors="tab:blue" if done else "none", edgecolors="tab:blue")
        if result.best is not None and result.best.metric is not None:
            bx = result.best.params.get(key)
            if bx is not None:
                bpos = float(bx) if numeric else sorted({str(x) for x in xs}).index(str(bx))
                ax.scatter([bpos], [result.best.metric], s=160, marker="*", color="tab:orange",
                           zorder=3, label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(result.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{result.name}: {result.metric} per trial\n"
                 "(filled: finished, hollow: stopped early, star: best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_config_text(result: SweepResult, cfg: ModulaConfig,
                     source_raw: dict[str, Any] | None = None) -> str:
    """The best trial as a config file: the source file (or the resolved config) with the best
    values in place. Validates before it is returned."""
    assert result.best is not None and result.best_config is not None
    best = result.best
    section = tune_section(result.stage)
    header = [f"# best trial {best.trial_id} of sweep {result.name} (stage {result.stage}): "
              f"{result.metric} = {_fmt(best.metric)}",
              "# tuned: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()),
              f"# train with: modula train --config <this file> --stage "
              f"{_train_stage(result.stage)}"]
    if source_raw is not None:
        raw = copy.deepcopy(source_raw)
        sets = []
        for k, v in best.params.items():
            p = ".".join(tune_target(k, result.stage))
            sets.append(f"{p}={yaml.safe_dump(coerce_value(k, v), default_flow_style=True)}"
                        .replace("\n...\n", "").strip())
        st = result.best_config.stages.get(section)
        sets.append(f"stages.{section}.warmup_steps={st.warmup_steps}")
        raw = apply_overrides(raw, sets)
        config_from_dict(copy.deepcopy(raw), source="(best config)")  # validates
    else:
        # secrets are not written: give them through the environment (${VAR} in the file)
        raw = result.best_config.to_data(secrets="drop")
        header.append("# secrets (storage keys, serve.api_keys) are not written here")
    return "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False)


def _train_stage(stage: str) -> str:
    return "domains" if stage.startswith("domain:") else stage


def write_outputs(result: SweepResult, out: Path, cfg: ModulaConfig,
                  source_raw: dict[str, Any] | None = None, console: Any | None = None
                  ) -> dict[str, Path]:
    """Table in the terminal; CSV, Markdown, PNG and the best config in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["csv"] = out / "trials.csv"
    _write_csv(result, files["csv"])
    plot = plot_sweep(result, out / "metric_vs_params.png", cfg)
    if plot:
        files["plot"] = plot
    if result.best is not None:
        files["best_config"] = out / "best.yaml"
        files["best_config"].write_text(best_config_text(result, cfg, source_raw))
        load_config(files["best_config"])  # the file as a user will load it
    files["markdown"] = out / "trials.md"
    _write_markdown(result, files["markdown"], files)
    if console is not None:
        console.print(results_table(result))
        for k, p in files.items():
            console.print(f"  {k:<12} {p}", highlight=False)
        if result.best is None:
            console.print("[yellow]no trial finished with a metric: no best config written[/]")
        elif math.isfinite(result.best.metric or math.nan):
            console.print(f"best trial [bold]{result.best.trial_id}[/]: "
                          f"{result.metric} = {_fmt(result.best.metric)}", highlight=False)
    return files
