"""The inference fast path (ModulaModel.prepare_inference, modula/model/inference.py) against the
reference loop, fp32, within 1e-5: every variant, every per-row routing input, gate capture,
beams, the model families (biases, GPT-2's Conv1D, GPT-NeoX's fused projection); and when the
prepared weights are released (training, loading experts, domains) or not used (gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from test_model_common import layer_config, randomise_adapters, tiny_model, token_batch

from modula.config import RouterConfig
from modula.model import attach_modula, load_expert, save_expert
from modula.model import inference as inference_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = ["code", "math", "units"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def build(variant="res", family="llama", domains=DOMAINS, seed=0, **kw):
    doms = [] if variant == "lora" else list(domains)
    model = attach_modula(tiny_model(family, seed), layer_config(variant, **kw), doms)
    randomise_adapters(model)
    model.eval()
    return model


@pytest.fixture()
def fused_calls(monkeypatch):
    """How many group forwards took the fused path."""
    calls = []
    real = inference_mod.fused_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference_mod, "fused_forward", spy)
    return calls


def both(model, ids, **kw):
    """(reference, prepared) logits of the same call, and the gates each captured."""
    out = {}
    for backend in ("reference", "auto"):
        model.kernel_backend = backend
        with torch.no_grad(), model.capture_gates():
            logits = model(input_ids=ids, **kw).logits
        gates = model.gate_weights() if model.variant != "lora" else {}
        out[backend] = (logits, gates)
    model.kernel_backend = "auto"
    return out["reference"], out["auto"]


def check(model, ids, **kw):
    (ref, ref_gates), (got, got_gates) = both(model, ids, **kw)
    torch.testing.assert_close(got, ref, **TOL)
    assert sorted(got_gates) == sorted(ref_gates)
    for name, g in ref_gates.items():
        torch.testing.assert_close(got_gates[name], g, **TOL)
    return ref


def routing_cases(cols: int, rows: int = 4):
    g = torch.Generator().manual_seed(7)
    w = torch.rand(rows, cols, generator=g)
    w = w / w.sum(1, keepdim=True)
    partial = w.clone()
    partial[0] = math.nan
    partial[2] = math.nan
    mask = torch.ones(rows, cols, dtype=torch.bool)
    mask[1, 0] = False
    mask[3, -1] = False
    return {
        "routed": {},
        "pinned": {"expert_ids": [0, 1, 2, 0]},
        "fixed": {"expert_weights": w},
        "fixed_some": {"expert_weights": partial},
        "masked": {"expert_mask": mask},
        "pinned_some": {"expert_ids": [-1, 2, -1, 1]},
        "everything": {"expert_ids": [1, -1, -1, -1], "expert_weights": partial,
                       "expert_mask": mask},
    }


VARIANT_CASES = [("molora", {}), ("flan", {}), ("res", {}), ("res", {"res_input_norm": "rms"})]


@pytest.mark.parametrize("variant,kw", VARIANT_CASES)
def test_prepared_equals_reference_for_every_routing_input(variant, kw, fused_calls):
    model = build(variant, **kw)
    model.prepare_inference()
    ids = token_batch(4, 6)
    for name, case in routing_cases(len(model.expert_names)).items():
        before = len(fused_calls)
        ref = check(model, ids, **case)
        assert len(fused_calls) > before, f"{name}: the fused path did not run"
        assert ref.abs().max() > 1e-3


def test_prepared_lora_equals_reference(fused_calls):
    model = build("lora")
    model.prepare_inference()
    check(model, token_batch(3, 5))
    assert fused_calls


@pytest.mark.parametrize("variant", ["flan", "res"])
@pytest.mark.parametrize("forced", ["math", "universal"])
def test_prepared_forced_domain(variant, forced):
    model = build(variant)
    model.prepare_inference()
    model.force_domain(forced)
    ids = token_batch(4, 5)
    check(model, ids)
    w = torch.full((4, len(model.expert_names)), math.nan)
    w[1] = 0.0
    w[1, -1] = 1.0  # a fixed row keeps its weights under a forced domain
    check(model, ids, expert_weights=w, expert_ids=[-1, -1, 0, -1])


@pytest.mark.parametrize("router", [RouterConfig(top_k=2), RouterConfig(temperature=0.5),
                                    RouterConfig(top_k=1, temperature=2.0)])
@pytest.mark.parametrize("variant", ["flan", "res"])
def test_prepared_top_k_and_temperature(variant, router):
    model = build(variant, router=router)
    model.prepare_inference()
    ids = token_batch(4, 6)
    check(model, ids)
    mask = torch.ones(4, len(model.expert_names), dtype=torch.bool)
    mask[0, 1] = False
    check(model, ids, expert_mask=mask)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2", "gpt_neox"])
def test_prepared_on_each_family(family, fused_calls):
    """Biases (Qwen2's q/k/v), Conv1D bases that keep their own GEMM (GPT-2), a fused
    query_key_value (GPT-NeoX)."""
    model = build("res", family=family)
    model.prepare_inference()
    ids = token_batch(3, 6)
    check(model, ids)
    check(model, ids, expert_ids=[2, -1, 0])
    assert fused_calls


def test_siblings_share_one_gemm_and_the_base_weights():
    model = build("res")
    layers = model.modula_layers()
    before = {p: lyr.base_layer.weight.detach().clone() for p, lyr in layers.items()}
    model.prepare_inference()
    q, k, v = (layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    gate, up = (layers[f"model.layers.0.mlp.{n}_proj"] for n in ("gate", "up"))
    o = layers["model.layers.0.self_attn.o_proj"]
    assert q._prepared[0] is k._prepared[0] is v._prepared[0]
    assert gate._prepared[0] is up._prepared[0]
    assert len(o._prepared[0].layers) == 1
    # the base weights are views of the group's matrix, with their values
    fused = q._prepared[0].fused.W_t
    for lyr in (q, k, v):
        assert lyr.base_layer.weight.untyped_storage().data_ptr() == \
            fused.untyped_storage().data_ptr()
    for p, lyr in layers.items():
        torch.testing.assert_close(lyr.base_layer.weight, before[p], rtol=0, atol=0)
    model.release_inference()
    for p, lyr in layers.items():
        w = lyr.base_layer.weight
        assert w.data._base is None and w.is_contiguous()
        torch.testing.assert_close(w, before[p], rtol=0, atol=0)


def test_prepared_model_saves_after_release(tmp_path):
    model = build("res")
    model.prepare_inference()
    model.release_inference()
    model.base_model.save_pretrained(str(tmp_path))  # no storage shared between tensors
    assert (tmp_path / "model.safetensors").exists()


def test_a_sibling_called_with_another_input_computes_its_own():
    model = build("res")
    model.prepare_inference()
    layers = model.modula_layers()
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        q(x)
        got_k_other = k(other)
        got_q_twice = (q(x), q(x))
        got_k = k(x)
        model.kernel_backend = "reference"
        torch.testing.assert_close(got_k_other, k(other), **TOL)
        torch.testing.assert_close(got_q_twice[0], q(x), **TOL)
        torch.testing.assert_close(got_q_twice[1], q(x), **TOL)
        torch.testing.assert_close(got_k, k(x), **TOL)


def test_prepared_generate_with_beams_and_pins():
    model = build("res")
    ids = token_batch(2, 4)
    kw = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    model.kernel_backend = "reference"
    want = model.generate(input_ids=ids, expert_ids=[0, 2], **kw)
    want_w = model.generate(input_ids=ids, expert_weights=torch.tensor(
        [[0.5, 0.5, 0.0], [math.nan] * 3]), **kw)
    model.kernel_backend = "auto"
    model.prepare_inference()
    assert torch.equal(model.generate(input_ids=ids, expert_ids=[0, 2], **kw), want)
    assert torch.equal(model.generate(input_ids=ids, expert_weights=torch.tensor(
        [[0.5, 0.5, 0.0], [math.nan] * 3]), **kw), want_w)


def test_disable_adapters_on_a_prepared_model_is_the_base():
    base = tiny_model("llama", 0)
    ids = token_batch(2, 5)
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = build("res")
    model.prepare_inference()
    with torch.no_grad(), model.disable_adapters():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_adapter_dtype_on_a_half_precision_base_stays_on_the_general_path(fused_calls):
    base = tiny_model().to(torch.bfloat16)
    model = attach_modula(base, layer_config("res"), DOMAINS, adapter_dtype=torch.float32)
    randomise_adapters(model)
    model.eval()
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.prepare_inference()
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # bf16 input: the general path ran
    assert not fused_calls


# ---- when the prepared weights go ---------------------------------------------------------


def test_training_releases_and_gradients_take_the_general_path(fused_calls):
    model = build("res")
    model.prepare_inference()
    assert model.inference_prepared
    model.set_stage("router")
    assert not model.inference_prepared
    ids = token_batch(2, 5)
    model(input_ids=ids).logits.sum().backward()
    lyr = model.modula_layers()["model.layers.0.self_attn.q_proj"]
    assert lyr.router.weight.grad is not None and lyr.router.weight.grad.abs().max() > 0
    assert not fused_calls
    with pytest.raises(ValueError, match="set_stage\\(None\\)"):
        model.prepare_inference()
    # prepared, but a parameter asks for gradients: the general path builds the graph
    model.set_stage(None)
    model.prepare_inference()
    lyr.router.weight.requires_grad_(True)
    model(input_ids=ids).logits.sum().backward()
    assert not fused_calls and lyr.router.weight.grad.abs().max() > 0


def test_eval_mode_only(fused_calls):
    model = build("res")
    model.prepare_inference()
    model.train()
    with torch.no_grad():
        model(input_ids=token_batch())
    assert not fused_calls


def test_new_weights_release_the_prepared_model(tmp_path):
    model = build("res")
    ids = token_batch(3, 5)
    other = build("res", seed=0)
    randomise_adapters(other, seed=9)
    save_expert(other, "math", tmp_path / "math.safetensors")
    model.prepare_inference()
    load_expert(model, "math", tmp_path / "math.safetensors", verify_base=False)
    assert not model.inference_prepared
    model.kernel_backend = "reference"
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.kernel_backend = "auto"
    model.prepare_inference()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, **TOL)
    model.add_domain("legal")
    assert not model.inference_prepared
    model.prepare_inference()
    check(model, ids, expert_ids=[3, 0, -1])
    model.remove_domain("code")
    assert not model.inference_prepared
