"""Evaluation: per-domain metrics (response perplexity, exact match by greedy generation,
label accuracy), general ability (held-out general perplexity), the domain average, the
comparison table across variants (terminal, JSON, Markdown) and the PNGs (per-domain bars,
router gate heatmaps). Works on any Hugging Face causal LM and on MoDULA models."""

from modula.eval.evaluate import (
    DomainResult,
    GateShares,
    VariantResult,
    collect_gate_shares,
    evaluate_domain,
    evaluate_model,
)
from modula.eval.report import load_results, render_table, save_result, write_report
from modula.eval.run import eval_records, register_variant_loader, run_eval

__all__ = [
    "DomainResult",
    "GateShares",
    "VariantResult",
    "collect_gate_shares",
    "eval_records",
    "evaluate_domain",
    "evaluate_model",
    "load_results",
    "register_variant_loader",
    "render_table",
    "run_eval",
    "save_result",
    "write_report",
]
