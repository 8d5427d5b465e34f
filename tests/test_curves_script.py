"""benchmarks/curves.py end to end on a tiny storage made here (a tiny random Llama, a tokenizer
trained on a few lines, a few records per split): the universal expert is trained in process
(nothing is published), every setting's curve has its points, the JSON and PNG are written."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml

from modula.infra.layout import split_key

DOMAINS = {
    "general": [(f"Tell me about item {i}.", f"Item {i} is a thing.") for i in range(24)],
    "math": [(f"What is {i} + {i % 3}?", f"The answer is {i + i % 3}.") for i in range(24)],
    "units": [(f"Convert {i} km to m.", f"{i}000 m") for i in range(24)],
}


def _curves_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curves.py"
    spec = importlib.util.spec_from_file_location("curves_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def tiny_root(tmp_path):
    """A storage root with splits of three domains and a config whose base is a tiny HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modula.config import StorageConfig
    from modula.data.io import records_table, write_table
    from modula.data.tokenizer import train_tokenizer
    from modula.infra.storage import Storage

    root = tmp_path / "store"
    st = Storage(StorageConfig(root=str(root)))
    texts = [f"{p}\n{r}" for rows in DOMAINS.values() for p, r in rows] * 4
    base = tmp_path / "base"
    tok = train_tokenizer(texts, 300, base)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(base)
    for name, rows in DOMAINS.items():
        recs = [{"id": f"{name}-{i}", "domain": name, "group": str(i), "prompt": p,
                 "response": r, "answer": r.removeprefix("The answer is ").rstrip(".")}
                for i, (p, r) in enumerate(rows)]
        for split, part in (("train", recs[:16]), ("validation", recs[16:])):
            write_table(st, split_key(name, split), records_table(part))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(root)},
        "model": {"base": str(base), "max_length": 64},
        "modula": {"variant": "res", "universal_rank": 4, "domain_rank": 2},
        "domains": [{"name": "general", "metric": "perplexity"},
                    {"name": "math", "metric": "exact_match"},
                    {"name": "units", "metric": "exact_match"}],
        "stages": {"universal": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
                   "domain": {"steps": 4, "batch_size": 2, "warmup_steps": 1}},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
    }))
    return root, config


@pytest.fixture()
def process_settings():
    """The script sets torch's threads and turns Hugging Face's progress bars off: put both
    back for the tests after this one."""
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    if bars:
        hf_logging.enable_progress_bar()


def test_curves_script_writes_curves_json_and_png(tiny_root, tmp_path, monkeypatch,
                                                  process_settings):
    root, config = tiny_root
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the universal's cache
    (tmp_path / "tmp").mkdir()
    curves = _curves_module()
    out = tmp_path / "out"
    assert curves.main(["--root", str(root), "--config", str(config), "--settings", "2x2,1x4",
                        "--every", "1", "--val-examples", "4", "--em-examples", "2",
                        "--threads", "1", "--out", str(out), "--name", "t"]) == 0
    data = json.loads((out / "t.json").read_text())
    assert (out / "t.png").stat().st_size > 0
    assert data["settings"]["comparison"] == "equal examples"
    assert data["universal"]["source"].startswith("trained here")
    assert list(data["domains"]) == ["math", "units"]
    for d in data["domains"].values():
        assert [r["setting"] for r in d["runs"]] == ["2x2", "1x4"]
        for r in d["runs"]:
            # a point before the first step and one after each step (--every 1)
            assert [c["step"] for c in r["curve"]] == list(range(r["steps"] + 1))
            assert [c["rows_seen"] for c in r["curve"]] == [s * r["rows"] for s in
                                                           range(r["steps"] + 1)]
            assert all(math.isfinite(c["val_loss"]) for c in r["curve"])
            assert r["rows_seen"] == 4 and r["em_examples"] == 2
            assert 0.0 <= r["exact_match"] <= 100.0
    # a trained expert moves the loss off the universal-only start
    first = data["domains"]["math"]["runs"][0]["curve"]
    assert first[-1]["val_loss"] != first[0]["val_loss"]
    # the universal expert trained once is reused from the cache; --from-json redraws
    assert curves.main(["--root", str(root), "--config", str(config), "--settings", "2x1",
                        "--domains", "units", "--val-examples", "2", "--em-examples", "0",
                        "--threads", "1", "--out", str(out), "--name", "u"]) == 0
    again = json.loads((out / "u.json").read_text())
    assert "cached" in again["universal"]["source"]
    assert again["domains"]["units"]["runs"][0]["exact_match"] is None
    assert curves.main(["--from-json", str(out / "t.json"), "--out", str(tmp_path / "re"),
                        "--name", "t"]) == 0
    assert (tmp_path / "re" / "t.png").is_file()


def test_settings_and_comparisons():
    curves = _curves_module()
    assert curves.parse_settings("16x80, 4x320") == [(16, 80), (4, 320)]
    assert curves.comparison([(16, 80), (4, 320)]) == "equal examples"
    assert curves.comparison([(16, 320), (4, 320)]) == "equal steps"
    with pytest.raises(SystemExit):
        curves.parse_settings("16by80")
