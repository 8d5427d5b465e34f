"""Every table the CLI prints stays readable in an 80-column terminal: nothing cut with "…",
no line wider than the terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from modula.config import ModulaConfig
from modula.config.commands import config_table
from modula.data.commands import datasets_table
from modula.demo import answers_table
from modula.eval.evaluate import DomainResult, VariantResult
from modula.eval.report import VARIANT_ORDER, render_table
from modula.infra.commands import experts_table, models_table, pulled_table, resources_table
from modula.infra.registry import BaseModelRef, ExpertEntry, FileEntry, ModelVersion
from modula.model.commands import export_table
from modula.model.export import Exported
from modula.trainers.commands import cost_table, pretrain_table
from modula.trainers.pretrain import PretrainResult
from modula.trainers.runner import RunCost
from modula.tuning.report import results_table
from modula.tuning.results import SweepResult, TrialRow

ROOT = "/home/someone/projects/modula/runs"


def _version() -> ModelVersion:
    names = ["universal", "code", "math", "units", "headlines", "routers"]
    files = {f"{n}.safetensors": FileEntry(f"{n}.safetensors", "a" * 64, 123_456) for n in names}
    experts = {n: ExpertEntry(n, "domain", f"{n}.safetensors", "b" * 64, 123_456, 3,
                              metrics={"final_loss": 1.23456}) for n in names}
    return ModelVersion("modula-molora", 12, "2026-11-28T07:16:14Z", files, experts,
                        BaseModelRef("builtin:tiny", "c" * 64), "molora")


def _costs() -> list[RunCost]:
    def node(rank: int, i: int) -> dict:
        return {"rank": rank, "node_id": f"{i:02d}" + "ab" * 27, "ip": f"10.128.200.{i}"}

    def cost(trains: list[str], workers: int = 1, resumed: int = 0, at: int = 1) -> RunCost:
        nodes = [node(r, at + r) for r in range(workers)]
        history = [[n["node_id"] for n in nodes]] * (resumed + 1)
        return RunCost(f"modula-res-{'-'.join(trains)}-0123456789", "domains", "res", trains,
                       1_234_567, 12_345_678, 370, workers, 1234.5, 1200.0, 2400.0, 2.3456,
                       resumed=resumed, effective_batch=128 * workers, nodes=nodes,
                       node_history=history)

    return [cost(["universal"]), cost(["headlines"], workers=2, resumed=1, at=2),
            cost(["routers"], at=3), cost(["code", "math", "units", "headlines", "routers"])]


def _results() -> dict[str, VariantResult]:
    domains = {d: DomainResult(d, m, 100, 4375.25, None if m == "perplexity" else 65.0)
               for d, m in (("code", "perplexity"), ("math", "exact_match"),
                            ("units", "exact_match"), ("headlines", "accuracy"))}
    return {v: VariantResult(v, "test", domains, 4375.25, 65.0, 1234.56, 12.0)
            for v in VARIANT_ORDER}


def _sweep() -> SweepResult:
    trials = [TrialRow(f"t_0000{i}", status, {"lr": 3e-3, "universal_rank": 8,
                                              "router_temperature": 0.5}, 2.5, 60, 120, 6,
                       wall_seconds=123.4, rank=i + 1)
              for i, status in enumerate(["finished", "stopped early", "error"])]
    return SweepResult("modula-res-router", "router", "val_loss_headlines", "min", ROOT,
                       trials, trials[0], None)


def _datasets():
    table, add = datasets_table(f"datasets in {ROOT}/data")
    for d in ("general", "code", "headlines"):
        add({"domain": d, "source": "s3://bucket/a/rather/long/prefix/headlines.parquet",
             "counts": {"train": 20000, "validation": 1000, "test": 1000, "corpus": 12345},
             "groups": {"train": 1234, "validation": 123, "test": 123}, "seconds": 12.3})
    return table


TABLES = {
    "cost": lambda: cost_table(_costs(), "cost of adding 'headlines' (v12)"),
    "registry list": lambda: models_table(f"{ROOT}/registry", [(_version(), 12)]),
    "registry experts": lambda: experts_table(_version()),
    "registry pull": lambda: pulled_table(_version(), f"{ROOT}/pulled/modula-molora-v12",
                                          ["universal.safetensors"]),
    "export": lambda: export_table(Exported(
        "modula-molora", 12, "peft", Path(f"{ROOT}/export"),
        {n: Path(f"{ROOT}/export/{n}") for n in ("universal", "code", "headlines")})),
    "data build": _datasets,
    "cluster": lambda: resources_table(ModulaConfig(), {"CPU": 64.0, "memory": 2**38,
                                                        "object_store_memory": 2**36,
                                                        "accelerator_type:H100": 1.0}),
    "pretrain": lambda: pretrain_table(PretrainResult(
        "models/builtin-tiny/0123456789abcdef", "f" * 64, 2_361_024, False, 200, 819_200,
        214.0, 253.0, 11.0, {"general": 4375.2, "code": 4446.1}, {"general": 217.3, "code": 90.1}),
        f"{ROOT}/models/builtin-tiny/0123456789abcdef"),
    "eval comparison": lambda: render_table(_results()),
    "tune trials": lambda: results_table(_sweep()),
    "validate": lambda: config_table(ModulaConfig().to_data(), "modula config: default"),
    "demo answers": lambda: answers_table(
        [{"domain": "headlines", "prompt": "Is this headline good or bad news for the company?",
          "answer": "good news, as the quarterly revenue beats the estimates by far",
          "expected": "good", "gates": {"code": 0.12, "math": 0.2, "units": 0.3,
                                        "headlines": 0.38},
          "classifier": {"universal": 0.05, "code": 0.05, "headlines": 0.9},
          "right": 3, "asked": 5, "own_gate": 0.38}], "served answers, routed by request"),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_reads_at_80_columns(name):
    console = Console(width=80, record=True, color_system=None)
    console.print(TABLES[name](), crop=False)  # a table wider than 80 shows, not cropped
    text = console.export_text()
    assert "…" not in text, f"{name} cuts a cell at 80 columns:\n{text}"
    assert max(len(line) for line in text.splitlines()) <= 80, text
