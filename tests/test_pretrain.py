"""Stage 0: the loop pieces (Ray-free), and a short real pretraining run on Ray Train that
lowers held-out perplexity, is stored with save_pretrained and is reused by fingerprint."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from modula.config import ModulaConfig
from modula.infra.storage import Storage
from modula.trainers.common import MetricsLog, lr_multiplier, make_optimizer, make_scheduler
from modula.trainers.pretrain import load_pretrain_checkpoint, save_pretrain_checkpoint, train_step


def test_lr_schedule_warms_up_then_decays():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cosine = 0
    assert lr_multiplier(100, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(500, 100, 10) == pytest.approx(0.1)
    vals = [lr_multiplier(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert lr_multiplier(0, 10, 0) == pytest.approx(1.0)


def test_metrics_log_round_trip(tmp_path):
    from modula.config import StorageConfig

    log = MetricsLog()
    log.log(step=1, loss=2.5)
    log.log(step=2, loss=2.0, event="x")
    again = MetricsLog.from_jsonl(log.to_jsonl())
    assert again.rows == log.rows and again.last("loss") == 2.0 and again.last("nope") is None
    st = Storage(StorageConfig(root=str(tmp_path)))
    log.save(st, "runs/x/metrics.jsonl")
    assert [json.loads(x)["step"] for x in st.read_text("runs/x/metrics.jsonl").splitlines()] == [1, 2]


def _tiny_llama(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2))


def test_optimizer_groups_and_train_step_learns():
    model = _tiny_llama()
    opt = make_optimizer(model, 1e-2, weight_decay=0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and not any("norm" in n or "embed" in n for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    ids = torch.randint(2, 64, (4, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).expand(4, 16)}
    first = train_step(model, batch, opt)
    assert first["tokens"] == 4 * 12 and first["grad_norm"] > 0 and first["lr"] == 1e-2
    for _ in range(15):
        last = train_step(model, batch, opt)
    assert last["loss"] < first["loss"] - 0.5


def test_checkpoint_round_trip(tmp_path):
    from modula.config import StageConfig

    model = _tiny_llama()
    opt = make_optimizer(model, 1e-2)
    sched = make_scheduler(opt, StageConfig(steps=20, warmup_steps=2))
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
    for _ in range(3):
        train_step(model, batch, opt, sched)
    log = MetricsLog()
    log.log(step=3, loss=1.0)
    save_pretrain_checkpoint(tmp_path / "ck", model, opt, sched, 3, log)
    fresh = _tiny_llama()
    fresh_opt = make_optimizer(fresh, 1e-2)
    fresh_sched = make_scheduler(fresh_opt, StageConfig(steps=20, warmup_steps=2))
    step, log2 = load_pretrain_checkpoint(tmp_path / "ck", fresh, fresh_opt, fresh_sched)
    assert step == 3 and log2.rows == log.rows
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert fresh_sched.last_epoch == sched.last_epoch
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # the next step is identical from the original and the restored state
    a = train_step(model, batch, opt, sched)
    b = train_step(fresh, batch, fresh_opt, fresh_sched)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


SMALL = {"train": 150, "validation": 20, "test": 20}


def _pretrain_cfg(root) -> ModulaConfig:
    return ModulaConfig(
        storage={"root": str(root)},
        model={"max_length": 128, "tiny": {"vocab_size": 512, "hidden_size": 48, "num_layers": 2,
                                           "num_heads": 4, "num_kv_heads": 2,
                                           "intermediate_size": 96, "max_position_embeddings": 128}},
        domains=[{"name": "general", "metric": "perplexity", "splits": SMALL},
                 {"name": "code", "metric": "perplexity", "splits": SMALL},
                 {"name": "math", "metric": "exact_match", "splits": SMALL},
                 {"name": "headlines", "metric": "accuracy", "splits": SMALL}],
        stages={"pretrain": {"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3,
                             "checkpoint_every": 15, "max_failures": 0,
                             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}},
        eval={"max_examples": 6, "max_new_tokens": 8, "batch_size": 8},
    )


@pytest.mark.integration
def test_short_pretraining_run_lowers_heldout_perplexity(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modula.basemodel import builtin_key, resolve_base_dir
    from modula.eval.report import write_report
    from modula.eval.run import run_eval
    from modula.infra.layout import PRETRAIN_RUNS as RUNS_PREFIX
    from modula.trainers.pretrain import run_pretrain

    cfg = _pretrain_cfg(tmp_path / "store")
    st = Storage(cfg.storage)
    res = run_pretrain(cfg, st, show_progress=False)
    assert not res.cached and res.steps == 30 and res.tokens > 30 * 8 * 50
    for d in ("general", "code"):
        # an untrained model is near-uniform over the vocabulary; 30 steps must beat that clearly
        assert res.perplexity_before[d] > 300
        assert res.perplexity_after[d] < 0.5 * res.perplexity_before[d], (d, res)
    assert math.isfinite(res.final_loss)

    # a standard HF model folder with its tokenizer, under the fingerprinted key
    path = resolve_base_dir(cfg, st)
    assert str(path).endswith(builtin_key(cfg))
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert model.config.hidden_size == 48 and tok.chat_template
    assert sum(p.numel() for p in model.parameters()) == res.parameters
    # Ray Train run folder: checkpoints persisted (num_workers >= 1); our own metrics log
    run_dirs = st.list_dirs(RUNS_PREFIX)
    assert len(run_dirs) == 1
    assert any(k.split("/")[-2].startswith("checkpoint_") for k in st.list(f"{RUNS_PREFIX}/{run_dirs[0]}"))
    steps = [json.loads(x).get("step") for x in st.read_text(f"{RUNS_PREFIX}/{run_dirs[0]}/metrics.jsonl").splitlines()]
    assert steps[-1] == 30

    # same config: reused, no training
    t0 = time.time()
    again = run_pretrain(cfg, st, show_progress=False)
    assert again.cached and again.perplexity_after == res.perplexity_after
    assert time.time() - t0 < 5

    # the base-model row of the comparison, through the built-in loader
    result, gates = run_eval(cfg, st, variant="base")
    assert gates is None
    assert set(result.domains) == {"general", "code", "math", "headlines"}
    assert result.domains["general"].n == 6
    assert result.general_perplexity < res.perplexity_before["general"]
    files = write_report(st, tmp_path / "report")
    assert "base model" in files["markdown"].read_text()
