"""Per-row routing inputs of one call: pinned ids, fixed weights, masks (ModulaModel.forward)."""

from __future__ import annotations

import math

import pytest
import torch
from test_model_common import layer_config, randomise_adapters, tiny_model, token_batch

from modula.model import attach_modula
from modula.model import layer as layer_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = ["code", "math", "units"]


def build(variant, domains=DOMAINS, seed=0, backend="reference"):
    model = attach_modula(tiny_model("llama", seed), layer_config(variant, kernel=backend),
                          list(domains))
    randomise_adapters(model)
    model.eval()
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


class given_gates:
    """An independent path to fixed gates: every layer's router is replaced by constants."""

    def __init__(self, weights):
        self.weights = weights

    def __enter__(self):
        self.orig = layer_mod.ModulaLinear._gates
        w = self.weights

        def fixed(layer, lg, mask=None):
            return w.to(lg.dtype).view(w.shape[0], *([1] * (lg.dim() - 2)), -1).expand(lg.shape)

        layer_mod.ModulaLinear._gates = fixed

    def __exit__(self, *exc):
        layer_mod.ModulaLinear._gates = self.orig


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
@pytest.mark.parametrize("backend", ["reference", "stacked"])
def test_fixed_weights_equal_constant_gates(variant, backend):
    model = build(variant, backend=backend)
    ids = token_batch(3, 6)
    cols = len(model.expert_names)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(3, cols, generator=g)
    w = w / w.sum(1, keepdim=True)
    got = logits(model, ids, expert_weights=w)
    with given_gates(w):
        want = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the captured gates are the given weights on every token
    with torch.no_grad(), model.capture_gates():
        model(input_ids=ids, expert_weights=w)
    for gates in model.gate_weights().values():
        torch.testing.assert_close(gates, w[:, None, :].expand_as(gates))


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_one_hot_weights_equal_pins(variant):
    model = build(variant)
    ids = token_batch(3, 6)
    names = model.expert_names
    w = torch.zeros(3, len(names))
    for row, d in enumerate(DOMAINS):
        w[row, names.index(d)] = 1.0
    torch.testing.assert_close(logits(model, ids, expert_weights=w),
                               logits(model, ids, expert_ids=[0, 1, 2]), rtol=1e-5, atol=1e-5)


def test_res_zero_weights_are_the_universal_expert_alone():
    model = build("res")
    ids = token_batch(2, 5)
    got = logits(model, ids, expert_weights=torch.zeros(2, 3))
    model.force_domain("universal")
    want = logits(model, ids)
    model.force_domain(None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_mask_equals_the_model_without_those_experts(variant):
    full = build(variant)
    ids = token_batch(2, 6)
    names = full.expert_names
    mask = torch.tensor([[n != "math" for n in names]] * 2)
    got = logits(full, ids, expert_mask=mask)
    fewer = build(variant)
    fewer.remove_domain("math")  # drops the expert and its router row
    torch.testing.assert_close(got, logits(fewer, ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), full.capture_gates():
        full(input_ids=ids, expert_mask=mask)
    for gates in full.gate_weights().values():
        assert float(gates[..., names.index("math")].abs().max()) == 0.0
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_res_mask_allowing_nothing_is_the_universal_expert_alone():
    model = build("res")
    ids = token_batch(1, 5)
    got = logits(model, ids, expert_mask=torch.zeros(1, 3, dtype=torch.bool))
    model.force_domain("universal")
    torch.testing.assert_close(got, logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "stacked"])
def test_mixed_batch_equals_each_row_alone(backend):
    """One forward with a pinned row, a fixed row, a masked row and a routed row gives each
    row what it would get alone (rows of one batch never see each other's routing)."""
    model = build("res", backend=backend)
    ids = token_batch(4, 6)
    nan = math.nan
    weights = torch.tensor([[nan] * 3, [0.2, 0.0, 0.8], [nan] * 3, [nan] * 3])
    mask = torch.tensor([[True] * 3, [True] * 3, [True, False, True], [True] * 3])
    pins = [1, -1, -1, -1]
    got = logits(model, ids, expert_ids=pins, expert_weights=weights, expert_mask=mask)
    alone = [
        logits(model, ids[0:1], expert_ids=[1]),
        logits(model, ids[1:2], expert_weights=weights[1:2]),
        logits(model, ids[2:3], expert_mask=mask[2:3]),
        logits(model, ids[3:4]),
    ]
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_force_domain_fills_only_free_rows():
    model = build("flan")
    ids = token_batch(2, 5)
    w = torch.tensor([[math.nan] * 4, [0.0, 0.0, 1.0, 0.0]])  # row 1 fixed on "math"
    model.force_domain("units")
    got = logits(model, ids, expert_weights=w)
    model.force_domain(None)
    want = torch.cat([logits(model, ids[:1], expert_ids=[2]), logits(model, ids[1:], expert_ids=[1])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_with_weights_and_beams():
    model = build("res")
    ids = token_batch(2, 4)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, expert_weights=w,
                         num_beams=2, pad_token_id=0)
    pinned = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, expert_ids=[0, 2],
                            num_beams=2, pad_token_id=0)
    assert torch.equal(out, pinned)


@pytest.mark.parametrize("kw, match", [
    ({"expert_weights": torch.ones(2, 2)}, r"expert_weights must be \(rows, 3\)"),
    ({"expert_weights": torch.tensor([[1.0, -1.0, 0.0]] * 2)}, "finite and >= 0"),
    ({"expert_weights": torch.tensor([[1.0, math.nan, 0.0]] * 2)}, "all NaN"),
    ({"expert_weights": torch.tensor([[math.inf, 0.0, 0.0]] * 2)}, "finite"),
    ({"expert_mask": torch.ones(2, 4, dtype=torch.bool)}, r"expert_mask must be \(rows, 3\)"),
    ({"expert_ids": [0, 1, 2], "expert_weights": torch.ones(2, 3)}, "expert_weights must be"),
])
def test_bad_routing_inputs_are_refused(kw, match):
    model = build("res")
    with pytest.raises(ValueError, match=match):
        logits(model, token_batch(2, 4), **kw)


def test_flan_rows_need_an_expert():
    model = build("flan")
    with pytest.raises(ValueError, match="some weight"):
        logits(model, token_batch(1, 4), expert_weights=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="allow an expert"):
        logits(model, token_batch(1, 4), expert_mask=torch.zeros(1, 4, dtype=torch.bool))


def test_state_is_cleared_after_the_call():
    model = build("res")
    ids = token_batch(1, 4)
    plain = logits(model, ids)
    logits(model, ids, expert_weights=torch.zeros(1, 3), expert_mask=torch.zeros(1, 3).bool())
    torch.testing.assert_close(logits(model, ids), plain, rtol=0, atol=0)
