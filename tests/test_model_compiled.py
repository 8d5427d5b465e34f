"""The compiled decode step (``prepare_inference(compile="decode")``, serve.compile,
modula/model/compiled.py): against the ``reference`` kernels, fp32, within 1e-5, and its
fallback to eager when compiling fails.

Compiling is slow on a small CPU, so the per-routing checks run the traced branch of the
layers eager (``torch.compile`` replaced by the identity, ``_traced`` forced true): what the
compiled graph computes, minus inductor. One test (``slow``) compiles for real."""

from __future__ import annotations

import inspect
import logging
import math

import pytest
import torch
from test_model_common import layer_config, randomise_adapters, tiny_model, token_batch
from transformers import DynamicCache

from modula.model import attach_modula
from modula.model import compiled as compiled_mod
from modula.model import inference as inference_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = ["code", "math", "units"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def build(variant="res", **kw):
    doms = [] if variant == "lora" else DOMAINS
    model = attach_modula(tiny_model("llama", 0), layer_config(variant, **kw), doms)
    randomise_adapters(model)
    model.eval()
    return model


def routing_cases(cols: int, rows: int):
    g = torch.Generator().manual_seed(7)
    w = torch.rand(rows, cols, generator=g)
    w = w / w.sum(1, keepdim=True)
    partial = w.clone()
    partial[0] = math.nan
    mask = torch.ones(rows, cols, dtype=torch.bool)
    mask[1, 0] = False
    return {
        "routed": {},
        "pinned": {"expert_ids": [i % cols for i in range(rows)]},
        "fixed": {"expert_weights": w},
        "masked": {"expert_mask": mask},
        "everything": {"expert_ids": [-1, -1, 1][:rows], "expert_weights": partial,
                       "expert_mask": mask},
    }


def reference_last(model, prompt, new, **routing):
    """The reference kernels' logits of the last position of prompt + new (no cache)."""
    model.kernel_backend = "reference"
    try:
        with torch.inference_mode():
            return model(input_ids=torch.cat([prompt, new], 1), **routing).logits[:, -1]
    finally:
        model.kernel_backend = "auto"


def _cache_kw(model) -> str:
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decode_last(model, prompt, new, **routing):
    """An eager prefill of ``prompt``, then one decode step of ``new`` (the step the compiled
    path takes); its last logits and the cache."""
    cache = DynamicCache()
    kw = {_cache_kw(model): cache, "use_cache": True}
    with torch.inference_mode():
        model(input_ids=prompt, **kw, **routing)
        out = model(input_ids=new, **kw, **routing)
    return out.logits[:, -1], cache


@pytest.fixture()
def eager_compile(monkeypatch):
    """torch.compile as the identity and the layers on their traced branch: the compiled
    decode step's own code (the step's routing plan, the siblings' stash by identity), eager."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(inference_mod, "_traced", lambda: True)


@pytest.mark.parametrize("variant,kw", [("res", {}), ("res", {"res_input_norm": "rms"}),
                                        ("flan", {}), ("molora", {}), ("lora", {})])
def test_traced_decode_step_equals_reference(variant, kw, eager_compile):
    model = build(variant, **kw)
    model.prepare_inference(compile="decode")
    step = model.compiled_decode
    rows = 3
    prompt, new = token_batch(rows, 5), token_batch(rows, 1, seed=9)
    cases = routing_cases(len(model.expert_names), rows) if variant != "lora" else {"": {}}
    for name, case in cases.items():
        before = step.compiled_calls
        got, cache = decode_last(model, prompt, new, **case)
        assert step.compiled_calls == before + 1, f"{name}: the decode step was not compiled"
        assert cache.get_seq_length() == prompt.shape[1] + 1
        want = reference_last(model, prompt, new, **case)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert want.abs().max() > 1e-3
    assert step.failure is None


def test_prefill_capture_and_gradients_stay_eager(eager_compile):
    model = build("res")
    model.prepare_inference(compile="decode")
    step = model.compiled_decode
    prompt, new = token_batch(2, 4), token_batch(2, 1, seed=9)
    with torch.inference_mode():
        model(input_ids=prompt)
        assert step.compiled_calls == 0  # a prefill
        with model.capture_gates():
            model(input_ids=new)
        assert step.compiled_calls == 0  # gates captured
        with model.disable_adapters():
            model(input_ids=new)
        assert step.compiled_calls == 0
    model(input_ids=new)  # gradients enabled
    assert step.compiled_calls == 0
    with torch.inference_mode():
        model(input_ids=new)
    assert step.compiled_calls == 1
    model.set_stage("router")  # training releases the prepared weights, and the compiled step
    assert model.compiled_decode is None
    model.set_stage(None)
    with pytest.raises(ValueError, match="allowed: none, decode"):
        model.prepare_inference(compile="mixture")


def _warnings(caplog):
    return [r for r in caplog.records
            if r.name == compiled_mod.__name__ and r.levelno == logging.WARNING]


def test_compile_failing_at_wrap_time_runs_eager(monkeypatch, caplog):
    model = build("res")
    model.prepare_inference()
    prompt, new = token_batch(3, 5), token_batch(3, 1, seed=9)
    want, _ = decode_last(model, prompt, new, expert_ids=[0, -1, 2])

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger=compiled_mod.__name__):
        model.prepare_inference(compile="decode")
        got, _ = decode_last(model, prompt, new, expert_ids=[0, -1, 2])
    assert torch.equal(got, want)
    assert not model.compiled_decode.active
    assert "no C++ compiler" in model.compiled_decode.failure
    assert len(_warnings(caplog)) == 1


def test_compile_failing_at_the_first_step_runs_eager_once_warned(monkeypatch, caplog):
    """A failure inside the compiled call (inductor's first run, an unsupported op): the step
    runs again eager, from an untouched cache, and so do the later ones; one warning."""
    model = build("res")
    model.prepare_inference()
    prompt, new = token_batch(3, 5), token_batch(3, 1, seed=9)
    want, _ = decode_last(model, prompt, new)
    calls = []

    def compile_that_fails_when_run(fn, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            raise RuntimeError("inductor: unsupported op")
        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails_when_run)
    with caplog.at_level(logging.WARNING, logger=compiled_mod.__name__):
        model.prepare_inference(compile="decode")
        got, cache = decode_last(model, prompt, new)
        assert torch.equal(got, want)
        assert cache.get_seq_length() == prompt.shape[1] + 1
        with torch.inference_mode():
            model(input_ids=token_batch(3, 1, seed=4), use_cache=True,
                  **{_cache_kw(model): cache})
    assert calls == [1]  # given up after the first failure
    assert not model.compiled_decode.active and model.compiled_decode.compiled_calls == 0
    assert len(_warnings(caplog)) == 1
    assert all(g._stash is None for g in model._prepared)


@pytest.mark.slow
def test_compiled_decode_step_equals_reference():
    """torch.compile for real (inductor; about 3 minutes on a 2-core machine): a routed batch,
    a batch mixing every routing input, then a batch of another size and a longer prompt, each
    against the reference kernels within 1e-5. The last reuses the routed graph (dynamic
    shapes: no recompile), and no step gives up the compiled graph."""
    from torch._dynamo.utils import counters

    model = build("res", res_input_norm="rms")
    model.prepare_inference(compile="decode")
    step = model.compiled_decode
    cases = routing_cases(len(model.expert_names), 3)
    graphs = []
    for rows, seq, name in ((3, 5, "routed"), (3, 5, "everything"), (2, 7, "routed")):
        case = {k: v[:rows] for k, v in cases[name].items()}
        prompt, new = token_batch(rows, seq), token_batch(rows, 1, seed=9)
        before = step.compiled_calls
        got, _ = decode_last(model, prompt, new, **case)
        assert step.failure is None, step.failure
        assert step.compiled_calls == before + 1
        torch.testing.assert_close(got, reference_last(model, prompt, new, **case), **TOL)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], "another batch size and cache length compiled again"


def test_the_config_allows_what_the_model_compiles():
    from typing import get_args

    from modula.config.schema import ServeConfig

    assert get_args(ServeConfig.model_fields["compile"].annotation) == compiled_mod.COMPILE_TARGETS
    assert ServeConfig().compile == "none"
