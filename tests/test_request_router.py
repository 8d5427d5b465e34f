"""Request-level routing: the classifier on pooled prompt features, its weights, its file."""

from __future__ import annotations

import json

import pytest
import torch
from test_model_common import layer_config, randomise_adapters, tiny_model, token_batch

from modula.config import RouterConfig
from modula.model import (
    ExpertFileError,
    RequestRouter,
    attach_modula,
    load_expert,
    load_modula,
    request_gate_weights,
    save_expert,
    save_experts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = ["code", "math"]


def build(variant="res", seed=0, **kw):
    model = attach_modula(tiny_model("llama", seed), layer_config(variant, **kw), list(DOMAINS))
    randomise_adapters(model)
    model.eval()
    return model


def separable(n_per_class=40, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 3
    feats = torch.cat([centres[c] + torch.randn(n_per_class, d, generator=g) for c in range(classes)])
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return feats, labels


def test_fit_learns_and_is_deterministic():
    feats, labels = separable(d=8)
    a = RequestRouter(hidden_size=4, n_layers=2, n_domains=2)  # 2 layers x 4 = 8 features
    b = RequestRouter(hidden_size=4, n_layers=2, n_domains=2)
    fa = a.fit(feats, labels, steps=200, seed=3)
    b.fit(feats, labels, steps=200, seed=3)
    assert a.trained and fa["accuracy"] > 0.95
    assert torch.equal(a.head.weight, b.head.weight)
    assert (a.probs(feats).argmax(-1) == labels).float().mean() > 0.95
    assert not any(p.requires_grad for p in a.parameters())
    with pytest.raises(ValueError, match="labels must lie in"):
        a.fit(feats, labels + 5, steps=1)
    with pytest.raises(ValueError, match="features must be"):
        a.fit(feats[:, :3], labels, steps=1)


def test_classes_follow_the_domains():
    model = build("flan")
    rr = model.request_router
    feats, labels = separable(d=rr.n_features)
    rr.fit(feats, labels, steps=50)
    w_math = rr.head.weight[2].clone()
    model.add_domain("units")
    assert model.request_classes == ["universal", "code", "math", "units"]
    assert rr.n_classes == 4 and not rr.trained
    assert torch.equal(rr.head.weight[2], w_math) and float(rr.head.weight[3].abs().sum()) == 0
    model.remove_domain("code")
    assert rr.n_classes == 3 and torch.equal(rr.head.weight[1], w_math)


def test_gate_weights_semantics():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])  # [universal, code, math]
    flan1 = request_gate_weights(probs, "flan", 1)
    assert torch.equal(flan1, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    res1 = request_gate_weights(probs, "res", 1)
    assert torch.equal(res1, torch.tensor([[0.0, 0], [0, 1.0]]))  # top "universal": no expert
    res2 = request_gate_weights(probs, "res", 2)
    torch.testing.assert_close(res2, torch.tensor([[1 / 3, 0], [2 / 9, 7 / 9]]))
    flan_all = request_gate_weights(probs, "flan", None)
    torch.testing.assert_close(flan_all, probs)
    with pytest.raises(ValueError, match="MoDULA variant"):
        request_gate_weights(probs, "molora", 1)


def test_features_are_the_frozen_base_models_pooled_states():
    base = tiny_model("llama", 0)
    ids = token_batch(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        hs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    m = mask.float().unsqueeze(-1)
    want = torch.cat([(hs[i] * m).sum(1) / m.sum(1) for i in (1, 2)], -1)  # 2 layers: mid, last
    model = attach_modula(base, layer_config("res"), list(DOMAINS))
    randomise_adapters(model)  # the adapters are off for the features
    torch.testing.assert_close(model.request_features(ids, mask), want, rtol=1e-5, atol=1e-6)


def test_untrained_router_is_refused_and_molora_has_none():
    model = build("res")
    with pytest.raises(ValueError, match="not trained"):
        model.request_probs(token_batch(1, 4))
    molora = attach_modula(tiny_model("llama", 0), layer_config("molora"), list(DOMAINS))
    assert molora.request_router is None
    with pytest.raises(ValueError, match="no request router"):
        molora.request_features(token_batch(1, 4))


def test_config_allows_request_routing_for_flan_and_res_only():
    layer_config("res", router=RouterConfig(granularity="request"))
    with pytest.raises(ValueError, match="granularity"):
        layer_config("molora", router=RouterConfig(granularity="request"))


def _trained(model):
    feats, labels = separable(d=model.request_router.n_features, classes=3)
    model.request_router.fit(feats, labels, steps=60)
    return model


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_classifier_file_round_trip(tmp_path, variant):
    model = _trained(build(variant))
    manifest = save_experts(model, tmp_path, "base")
    assert {e["name"]: e["kind"] for e in manifest["experts"]}["classifier"] == "classifier"
    assert manifest["request_router"]["features"] == model.request_router.n_features
    loaded = load_modula(tiny_model("llama", 0), tmp_path)
    assert loaded.request_router.trained
    ids = token_batch(3, 5)
    torch.testing.assert_close(loaded.request_probs(ids), model.request_probs(ids), rtol=0, atol=0)
    # a model without a trained classifier publishes none, and loads untrained
    plain = build(variant)
    m2 = save_experts(plain, tmp_path / "plain", "base")
    assert "classifier" not in {e["name"] for e in m2["experts"]}
    assert not load_modula(tiny_model("llama", 0), tmp_path / "plain").request_router.trained


def test_classifier_file_for_other_classes_is_refused(tmp_path):
    model = _trained(build("res"))
    save_expert(model, "classifier", tmp_path / "classifier.safetensors")
    other = attach_modula(tiny_model("llama", 0), layer_config("res"), ["code", "math", "units"])
    with pytest.raises(ExpertFileError, match="classifier saved for classes"):
        load_expert(other, "classifier", tmp_path / "classifier.safetensors")
    same = build("res")
    load_expert(same, "classifier", tmp_path / "classifier.safetensors")
    assert same.request_router.trained
    meta = json.loads(json.loads((tmp_path / "classifier.safetensors").read_bytes()[8:].split(
        b"}}")[0].decode() + "}}")["__metadata__"]["modula"])
    assert json.loads(meta["expert_order"]) == ["universal", "code", "math"]


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_request_routed_forward_equals_the_pinned_expert(variant):
    """Top-1 request weights on a domain class give exactly the pinned expert's output."""
    model = _trained(build(variant))
    ids = token_batch(2, 5)
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    w = model.request_weights(probs, top_k=1)
    with torch.no_grad():
        got = model(input_ids=ids, expert_weights=w).logits
        want = model(input_ids=ids, expert_ids=[0, 1]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
