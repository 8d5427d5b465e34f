"""The baselines through the command a user runs: `modula train --stage lora` and
`--stage molora` train on Ray Train with the same code as the MoDULA stages, publish to the
registry, and the published models load (through the eval loaders) and fit the data better than
the bare base model."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

TINY = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}
SPLITS = {"train": 48, "validation": 8, "test": 8}
DOMAINS = ("math", "units")
STEPS = 12


def _raw(root: str, base: str) -> dict:
    stage = {"steps": STEPS, "batch_size": 8, "lr": 1.0e-2, "warmup_steps": 1,
             "checkpoint_every": 6, "max_failures": 0,
             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    return {
        "storage": {"root": root},
        "cluster": {"dashboard": False},
        "model": {"base": base, "tiny": TINY, "max_length": 96},
        "domains": [{"name": "general", "metric": "perplexity", "splits": SPLITS}]
        + [{"name": n, "splits": SPLITS} for n in DOMAINS]
        + [{"name": "headlines", "reserved": True, "metric": "accuracy", "splits": SPLITS}],
        "stages": {"lora": dict(stage), "molora": dict(stage)},
    }


@pytest.fixture(scope="module")
def baseline_setup(ray_local, tmp_path_factory):
    """A config file for a tiny random Llama (with the built-in tokenizer) saved like any HF
    model directory; the storage root is fresh for this module."""
    from modula.basemodel import build_model
    from modula.config import config_from_dict
    from modula.data.build import ensure_tokenizer
    from modula.data.tokenizer import load_tokenizer
    from modula.infra.storage import Storage

    root = tmp_path_factory.mktemp("baselines")
    base_dir = root / "tiny-base"
    raw = _raw(str(root / "store"), str(base_dir))
    cfg = config_from_dict({**raw, "model": {**raw["model"], "base": "builtin:tiny"}})
    st = Storage(cfg.storage)
    tok = load_tokenizer(st.uri(ensure_tokenizer(cfg, st)))
    build_model(cfg.model.tiny, tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    path = root / "baselines.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, config_from_dict(raw)


def _train_cli(config_path, stage: str) -> str:
    from modula.cli import app

    res = CliRunner().invoke(app, ["train", "--config", str(config_path), "--stage", stage])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def _response_loss(model, tok, records, max_length: int) -> float:
    from modula.eval.evaluate import response_nll

    total, n = response_nll(model, tok, records, max_length)
    return total / n


@pytest.mark.integration
def test_lora_and_molora_baselines_train_publish_and_load_through_the_cli(baseline_setup):
    import torch

    from modula.basemodel import load_base_model
    from modula.data.io import read_records
    from modula.eval.run import load_variant
    from modula.infra.registry import Registry
    from modula.infra.storage import Storage

    config_path, cfg = baseline_setup
    storage = Storage(cfg.storage)
    registry = Registry.from_config(cfg)

    outputs = {stage: _train_cli(config_path, stage) for stage in ("lora", "molora")}
    for stage, out in outputs.items():
        # (no "Traceback" check: Ray's logger may still hold the first CliRunner's closed
        # stream and print a "Logging error" of its own into the second one)
        assert f"cost of `train --stage {stage}`" in out and "training failed" not in out

    # the registry: one version each, under <model>-<variant> (the config's variant is res)
    assert {"modula-lora", "modula-molora"} <= set(registry.list_models())
    lora = registry.show("modula-lora")
    molora = registry.show("modula-molora")
    assert (lora.version, lora.variant) == (1, "lora")
    assert (molora.version, molora.variant) == (1, "molora")
    assert set(lora.experts) == {"universal"}  # one adapter on all the data mixed
    assert set(molora.experts) == {*DOMAINS, "routers"}  # no universal expert, jointly trained
    assert molora.metadata["domains"] == list(DOMAINS)  # the reserved domain is not trained
    assert molora.experts["routers"].kind == "router"
    assert {molora.experts[d].kind for d in DOMAINS} == {"domain"}

    # the cost of each run, recorded in the manifest; the same loop, the same budget
    costs = {}
    for v in (lora, molora):
        (run,) = v.metadata["runs"]
        costs[v.variant] = run
        assert run["stage"] == v.variant and run["variant"] == v.variant
        assert run["steps"] == STEPS and run["num_workers"] == 1 and run["resumed"] == 0
        assert run["tokens"] > STEPS * 8 * 4  # 8 rows a step, several response tokens a row
        assert run["wall_seconds"] > 0 and run["worker_seconds"] > 0
        assert run["wall_seconds"] >= run["loop_seconds"] * 0.99
        assert run["final_loss"] is not None and run["final_loss"] > 0
        for e in v.experts.values():
            assert e.training["run"] == run["run"] and e.training["steps"] == STEPS
            assert e.size > 0
    assert costs["lora"]["trains"] == ["universal"]
    assert costs["molora"]["trains"] == [*DOMAINS, "routers"]
    assert costs["molora"]["trainable_parameters"] > costs["lora"]["trainable_parameters"] > 0

    # the expert files exist (fetched, sha256-checked) and load through the eval loaders
    base, tok = load_base_model(cfg, storage)
    records = [r for d in ("general", *DOMAINS) for r in read_records(storage, d, "train", 16)]
    base_loss = _response_loss(base, tok, records, cfg.model.max_length)
    for v in (lora, molora):
        local = registry.fetch(v.model, dest=config_path.parent / f"fetched-{v.variant}")
        for name in v.experts:
            assert local.expert_path(name).is_file(), name
        manifest = json.loads((local.path / "manifest.json").read_text())
        assert manifest["variant"] == v.variant
        model, mtok = load_variant(cfg, storage, v.variant)
        assert model.domains == ([] if v.variant == "lora" else list(DOMAINS))
        # the zero-initialised expand matrices were trained: the adapters are no longer a no-op
        layer = next(iter(model.modula_layers().values()))
        trained = [layer.universal] if v.variant == "lora" else [layer.experts[d] for d in DOMAINS]
        assert all(float(e.B.abs().sum()) > 0 for e in trained)
        trainable = sum(p.numel() for n in v.experts for p in model.expert_parameters(n))
        assert trainable == costs[v.variant]["trainable_parameters"]
        ids = torch.randint(0, 100, (2, 12))
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
        # training lowered the loss on the data it saw (a random tiny base, 12 steps: by a few
        # hundredths of a nat; everything is seeded, so the margin is stable)
        loss = _response_loss(model, mtok, records, cfg.model.max_length)
        assert loss < base_loss - 0.03, (v.variant, loss, base_loss)
