"""MoDULA on tiny HF models: attaching, variants, stages, domains, forcing, gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_common import (
    FAMILIES,
    domains_for,
    layer_config,
    randomise_adapters,
    tiny_model,
    token_batch,
)
from transformers.pytorch_utils import Conv1D

from modula.config import RouterConfig
from modula.model import ModulaLinear, ModulaModel, attach_modula, mean_gate_per_expert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = ("lora", "molora", "flan", "res")
EXPECTED_LAYERS = {"llama": 14, "qwen2": 14, "mistral": 14, "gpt2": 8, "gpt_neox": 8}


def build(variant="res", family="llama", seed=0, **kw) -> ModulaModel:
    model = attach_modula(tiny_model(family, seed), layer_config(variant, **kw), domains_for(variant))
    randomise_adapters(model)
    return model


# ---- attaching -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_each_family(family):
    base = tiny_model(family)
    ids = token_batch()
    before = base(input_ids=ids).logits
    model = attach_modula(base, layer_config("res"), ["code", "math"])
    layers = model.modula_layers()
    assert len(layers) == EXPECTED_LAYERS[family]
    if family == "gpt2":
        assert all(isinstance(lyr.base_layer, Conv1D) for lyr in layers.values())
    # base frozen, new experts are a no-op (B = 0)
    assert all(not p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    randomise_adapters(model)
    after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    out = model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False, expert_ids=[0, 1, -1])
    assert out.shape == (3, 7)


def test_unmatched_target_names_targets_and_linear_layers():
    with pytest.raises(ValueError) as err:
        attach_modula(tiny_model(), layer_config("res", target_modules=["q_proj", "qkv"]), ["code"])
    msg = str(err.value)
    assert "['qkv']" in msg and "LlamaForCausalLM" in msg
    for name in ("q_proj", "down_proj", "gate_proj"):
        assert name in msg
    with pytest.raises(ValueError, match="embed_tokens .*Embedding"):
        attach_modula(tiny_model(), layer_config("res", target_modules=["embed_tokens"]), ["code"])
    with pytest.raises(ValueError, match="output head"):
        attach_modula(tiny_model(), layer_config("res", target_modules=["lm_head"]), ["code"])


def test_custom_targets_and_unknown_family_default():
    model = attach_modula(tiny_model(), layer_config("flan", target_modules=["v_proj", "mlp.down_proj"]), ["code"])
    assert sorted({p.rsplit(".", 1)[-1] for p in model.modula_layers()}) == ["down_proj", "v_proj"]

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 3)

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            return self.head(self.inner(x))

    m = attach_modula(Tiny(), layer_config("lora"), [])
    assert list(m.modula_layers()) == ["inner"]  # the output head is never a default target


def test_wrong_domain_lists_are_refused():
    with pytest.raises(ValueError, match="no domain experts"):
        attach_modula(tiny_model(), layer_config("lora"), ["code"])
    with pytest.raises(ValueError, match="at least one"):
        attach_modula(tiny_model(), layer_config("molora"), [])
    with pytest.raises(ValueError, match="invalid domain name"):
        attach_modula(tiny_model(), layer_config("flan"), ["Code!"])
    with pytest.raises(ValueError, match="invalid domain name"):
        attach_modula(tiny_model(), layer_config("flan"), ["universal"])
    with pytest.raises(ValueError, match="named twice"):
        attach_modula(tiny_model(), layer_config("flan"), ["code", "code"])
    model = build("flan")
    with pytest.raises(ValueError, match="already has MoDULA"):
        attach_modula(model.base_model, layer_config("flan"), ["code"])


def test_unload_restores_the_plain_model():
    base = tiny_model()
    ids = token_batch()
    before = base(input_ids=ids).logits
    model = build("res")
    plain = model.unload()
    assert not any(isinstance(m, ModulaLinear) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=ids).logits, before, rtol=0, atol=0)


# ---- the forward of each variant ---------------------------------------------------------


def _layer_input_output(model, path, ids, **call):
    """The input of one adapted layer and its output during a forward."""
    seen = {}
    lyr = model.modula_layers()[path]
    hook = lyr.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), y=out.detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, **call)
    finally:
        hook.remove()
    return lyr, seen["x"], seen["y"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_computes_the_paper_formula(variant):
    """One adapted layer, checked against the formula of docs/method.md written out by hand."""
    model = build(variant, router=RouterConfig(temperature=0.7))
    path = "model.layers.1.mlp.down_proj"
    lyr, x, y = _layer_input_output(model, path, token_batch())
    W0 = lyr.base_layer.weight
    su, sd = lyr.universal_scaling, lyr.domain_scaling
    base = x @ W0.t()
    experts = list(lyr.experts.values())
    if variant != "lora":
        s = torch.softmax(x @ lyr.router.weight.t() / 0.7, -1)
    if variant == "lora":
        want = base + su * x @ lyr.universal.A.t() @ lyr.universal.B.t()
    elif variant == "molora":
        want = base + sum(s[..., i : i + 1] * sd * x @ e.A.t() @ e.B.t() for i, e in enumerate(experts))
    elif variant == "flan":
        want = base + s[..., :1] * su * x @ lyr.universal.A.t() @ lyr.universal.B.t()
        want = want + sum(s[..., i + 1 : i + 2] * sd * x @ e.A.t() @ e.B.t() for i, e in enumerate(experts))
    else:
        h = su * x @ lyr.universal.A.t() @ lyr.universal.B.t()
        want = base + h + sum(
            s[..., i : i + 1] * sd * F.leaky_relu(h @ e.A.t(), 0.01) @ e.B.t() for i, e in enumerate(experts)
        )
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_backends_agree_on_the_whole_model(variant):
    model = build(variant)
    ids = token_batch()
    outs = {}
    for backend in ("reference", "stacked"):
        model.kernel_backend = backend
        with torch.no_grad():
            outs[backend] = model(input_ids=ids).logits
    torch.testing.assert_close(outs["stacked"], outs["reference"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        model.kernel_backend = "gpu"


def test_top_k_routing_renormalises():
    model = build("res", router=RouterConfig(top_k=1))
    model.add_domain("units")
    randomise_adapters(model, seed=3)
    with model.capture_gates(), torch.no_grad():
        model(input_ids=token_batch())
    for g in model.gate_weights().values():
        assert ((g > 0).sum(-1) == 1).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
    # k = 2 of 3: two experts share the mass
    model.modula_layers()["model.layers.0.self_attn.q_proj"].top_k = 2
    with model.capture_gates(), torch.no_grad():
        model(input_ids=token_batch())
    g = model.gate_weights()["model.layers.0.self_attn.q_proj"]
    assert ((g > 0).sum(-1) == 2).all()


def test_adapter_dtype_on_a_half_precision_base():
    base = tiny_model().to(torch.bfloat16)
    model = attach_modula(base, layer_config("res"), ["code"], adapter_dtype=torch.float32)
    randomise_adapters(model)
    lyr = next(iter(model.modula_layers().values()))
    assert lyr.universal.A.dtype == torch.float32 and lyr.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids=token_batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- stages ------------------------------------------------------------------------------


def _expected_trainable(variant: str, stage: str) -> callable:
    if stage == "universal":
        return lambda n: ".universal." in n
    if stage.startswith("domain:"):
        name = stage.split(":", 1)[1]
        return lambda n: f".experts.{name}." in n
    if stage == "router":
        return lambda n: n.endswith(".router.weight")
    return lambda n: any(k in n for k in (".universal.", ".experts.", ".router."))


STAGE_CASES = [
    ("lora", "universal"), ("lora", "joint"),
    ("molora", "router"), ("molora", "joint"),
    ("flan", "universal"), ("flan", "domain:math"), ("flan", "router"), ("flan", "joint"),
    ("res", "universal"), ("res", "domain:code"), ("res", "router"), ("res", "joint"),
]


@pytest.mark.parametrize("variant,stage", STAGE_CASES)
def test_optimiser_step_changes_only_the_stage_tensors(variant, stage):
    model = build(variant)
    model.set_stage(stage)
    expected = _expected_trainable(variant, stage)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if expected(n)} and trainable
    assert model.trainable_parameter_count() == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter is handed to the optimiser, weight decay on: frozen ones must not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} should have changed in stage {stage}"
        else:
            assert torch.equal(p, before[n]), f"{n} changed in stage {stage}"
            assert p.grad is None


def _perturb(model, predicate):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if predicate(n):
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize(
    "variant,stage,in_path,out_of_path",
    [
        ("flan", "universal", ".universal.", (".experts.", ".router.")),
        ("res", "universal", ".universal.", (".experts.", ".router.")),
        # Flan's domain stage: y = W0 x + B_i A_i x, the universal expert is out of the path
        ("flan", "domain:code", ".experts.code.", (".universal.", ".experts.math.", ".router.")),
        # Res's domain stage: y = W0 x + h + B_i LeakyReLU(A_i h), the gate fixed at 1
        ("res", "domain:code", ".experts.code.", (".experts.math.", ".router.")),
    ],
)
def test_stage_puts_exactly_the_right_experts_in_the_path(variant, stage, in_path, out_of_path):
    model = build(variant)
    model.set_stage(stage)
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _perturb(model, lambda n: any(k in n for k in out_of_path))
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
        _perturb(model, lambda n: in_path in n)
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-4


def test_res_domain_stage_keeps_the_universal_expert_in_the_path():
    model = build("res")
    model.set_stage("domain:code")
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _perturb(model, lambda n: ".universal." in n)
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-4


def test_res_domain_stage_equals_gate_fixed_at_one():
    model = build("res")
    path = "model.layers.0.mlp.up_proj"
    model.set_stage("domain:math")
    lyr, x, y = _layer_input_output(model, path, token_batch())
    h = lyr.universal_scaling * x @ lyr.universal.A.t() @ lyr.universal.B.t()
    e = lyr.experts["math"]
    want = x @ lyr.base_layer.weight.t() + h + lyr.domain_scaling * F.leaky_relu(h @ e.A.t(), 0.01) @ e.B.t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_stage_errors():
    with pytest.raises(ValueError, match="does not apply to variant 'molora'"):
        build("molora").set_stage("universal")
    with pytest.raises(ValueError, match="does not apply to variant 'lora'"):
        build("lora").set_stage("router")
    with pytest.raises(ValueError, match="unknown domain 'law'"):
        build("flan").set_stage("domain:law")
    with pytest.raises(ValueError, match="does not apply"):
        build("flan").set_stage("pretrain")
    model = build("flan")
    model.set_stage("joint")
    model.set_stage(None)
    assert model.trainable_parameter_count() == 0 and model.stage is None


# ---- domains -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_add_domain_grows_routers_and_leaves_experts_untouched(variant):
    model = build(variant)
    model.set_stage("router")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = token_batch()
    with torch.no_grad():
        model.force_domain("code")
        forced_before = model(input_ids=ids).logits
    model.add_domain("units")
    assert model.domains == ["code", "math", "units"]
    offset = 1 if variant == "flan" else 0
    for path, lyr in model.modula_layers().items():
        w = lyr.router.weight
        assert w.shape[0] == 3 + offset
        old = before[f"base_model.{path}.router.weight"]
        assert torch.equal(w[: 2 + offset], old) and torch.equal(w[-1], torch.zeros_like(w[-1]))
        assert torch.equal(lyr.experts["units"].B, torch.zeros_like(lyr.experts["units"].B))
        # still in router stage: the grown router trains, the new expert does not
        assert w.requires_grad and not lyr.experts["units"].A.requires_grad
    for n, p in model.named_parameters():
        if n in before and not n.endswith("router.weight") and not n.startswith("request_router"):
            assert torch.equal(p, before[n]), n
    if variant != "molora":  # the request classifier grows a class and must be retrained
        assert model.request_router.n_classes == 4 and not model.request_router.trained
    with torch.no_grad():  # the same up to float rounding (the GEMMs now include a zero expert)
        torch.testing.assert_close(model(input_ids=ids).logits, forced_before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_remove_domain(variant):
    model = build(variant)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.force_domain("math")
    ids = token_batch()
    with torch.no_grad():
        forced_math = model(input_ids=ids).logits
    model.remove_domain("code")
    assert model.domains == ["math"]
    offset = 1 if variant == "flan" else 0
    for path, lyr in model.modula_layers().items():
        old = before[f"base_model.{path}.router.weight"]
        keep = ([0] if offset else []) + [1 + offset]
        assert torch.equal(lyr.router.weight, old[keep])
        assert "code" not in lyr.experts
    with torch.no_grad():  # the forced domain is remapped to its new router index
        torch.testing.assert_close(model(input_ids=ids).logits, forced_math, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown domain"):
        model.remove_domain("law")


def test_removing_the_forced_or_training_domain_resets_it():
    model = build("flan")
    model.set_stage("domain:code")
    model.force_domain("code")
    model.remove_domain("code")
    assert model.stage is None and model.forced_domain is None
    molora = build("molora")
    molora.remove_domain("code")
    with pytest.raises(ValueError, match="at least one"):
        molora.remove_domain("math")


def test_add_domain_errors():
    with pytest.raises(ValueError, match="no domain experts"):
        build("lora").add_domain("code")
    with pytest.raises(ValueError, match="already exists"):
        build("res").add_domain("code")
    with pytest.raises(ValueError, match="invalid domain name"):
        build("res").add_domain("a.b")


# ---- forcing and mixed batches -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_force_domain_is_one_hot_gates(variant):
    model = build(variant)
    ids = token_batch()
    model.force_domain("math")
    with model.capture_gates(), torch.no_grad():
        forced = model(input_ids=ids).logits
    col = model.expert_names.index("math")
    for g in model.gate_weights().values():
        assert torch.equal(g, F.one_hot(torch.full(g.shape[:-1], col), g.shape[-1]).float())
    model.force_domain(None)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    assert (forced - routed).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown domain"):
        model.force_domain("law")


def test_force_universal():
    for variant in ("flan", "res"):
        model = build(variant)
        model.force_domain("universal")
        ids = token_batch()
        with torch.no_grad():
            forced = model(input_ids=ids).logits
            model.force_domain(None)
            model.set_stage("universal")  # the universal stage's path is the same
            alone = model(input_ids=ids).logits
        torch.testing.assert_close(forced, alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no universal"):
        build("molora").force_domain("universal")


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
@pytest.mark.parametrize("backend", ["stacked", "reference"])
def test_expert_ids_pin_rows_of_one_batch(variant, backend):
    """A mixed serving batch: each row equals that request served alone."""
    model = build(variant)
    model.kernel_backend = backend
    ids = token_batch(batch=4, seq=6)
    pins = torch.tensor([1, -1, 0, 1])
    with torch.no_grad():
        mixed = model(input_ids=ids, expert_ids=pins).logits
        for row, pin in enumerate(pins.tolist()):
            model.force_domain(model.domains[pin] if pin >= 0 else None)
            alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)
        model.force_domain(None)
        # -1 rows follow a forced domain when one is set
        model.force_domain("math")
        all_math = model(input_ids=ids).logits
        partly = model(input_ids=ids, expert_ids=[-1, -1, 0, -1]).logits
    torch.testing.assert_close(partly[[0, 1, 3]], all_math[[0, 1, 3]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(input_ids=ids, expert_ids=[0, 2, 0, 0])
    with pytest.raises(ValueError, match="1-D"):
        model(input_ids=ids, expert_ids=[[0]])


def test_expert_ids_follow_beams_in_generate():
    model = build("flan")
    ids = token_batch(batch=2, seq=4)
    out = model.generate(
        input_ids=ids, max_new_tokens=2, num_beams=2, do_sample=False, expert_ids=[0, 1]
    )
    assert out.shape == (2, 6)


# ---- gates -------------------------------------------------------------------------------


def test_gate_readout_and_means():
    model = build("flan", router=RouterConfig(temperature=2.0))
    ids = token_batch(batch=2, seq=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with pytest.raises(RuntimeError, match="capture_gates"):
        model.gate_weights()
    with model.capture_gates(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    gates = model.gate_weights()
    assert set(gates) == set(model.modula_layers())
    path = "model.layers.0.self_attn.k_proj"
    g = gates[path]
    assert g.shape == (2, 5, 3) and model.expert_names == ["universal", "code", "math"]
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))
    lyr, x, _ = _layer_input_output(model, path, ids, attention_mask=mask)
    torch.testing.assert_close(g, torch.softmax(x @ lyr.router.weight.t() / 2.0, -1))
    means = model.mean_gates(mask)
    assert means.shape == (2, 3)
    per_layer = model.mean_gates(mask, per_layer=True)
    assert per_layer.shape == (len(gates), 2, 3)
    i = list(gates).index(path)
    torch.testing.assert_close(per_layer[i, 1], g[1, 2:].mean(0))  # pads are ignored
    torch.testing.assert_close(per_layer[i, 0], g[0].mean(0))
    torch.testing.assert_close(means, per_layer.mean(0))


def test_mean_gate_helper_on_known_values():
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])  # (1, 3, 2)
    torch.testing.assert_close(mean_gate_per_expert(g), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(
        mean_gate_per_expert(g, torch.tensor([[1, 0, 0]])), torch.tensor([[1.0, 0.0]])
    )
    # a mask shorter than the gates (generated tokens) counts the extra positions
    torch.testing.assert_close(
        mean_gate_per_expert({"a": g, "b": g}, torch.tensor([[0, 1]]), per_layer=True),
        torch.tensor([[[0.25, 0.75]], [[0.25, 0.75]]]),
    )
    with pytest.raises(ValueError, match="does not fit"):
        mean_gate_per_expert(g, torch.ones(2, 3))


def test_gates_during_generation_span_prompt_and_new_tokens():
    model = build("res")
    ids = token_batch(batch=2, seq=4)
    with model.capture_gates():
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, expert_ids=[1, -1])
    g = model.gate_weights()["model.layers.1.mlp.gate_proj"]
    assert out.shape == (2, 7) and g.shape == (2, 6, 2)  # 4 prompt + 2 fed-back tokens
    assert torch.equal(g[0], torch.tensor([[0.0, 1.0]]).expand(6, 2))  # row 0 pinned to math
    assert not torch.equal(g[1], g[1].round())  # row 1 routed: soft gates


def test_capture_is_off_by_default():
    model = build("res")
    with torch.no_grad():
        model(input_ids=token_batch())
    assert model._state.capture is None


def test_stage_and_forcing_recorded_in_gates():
    model = build("res")
    model.set_stage("domain:math")
    with model.capture_gates(), torch.no_grad():
        model(input_ids=token_batch())
    g = next(iter(model.gate_weights().values()))
    assert torch.equal(g[..., 1], torch.ones_like(g[..., 1])) and g[..., 0].abs().sum() == 0
    model.set_stage("universal")
    with model.capture_gates(), torch.no_grad():
        model(input_ids=token_batch())
    assert next(iter(model.gate_weights().values())).abs().sum() == 0  # Res: no domain expert


def test_disable_adapters_gives_the_base_model():
    base_logits = tiny_model()(input_ids=token_batch()).logits
    model = build("res")
    with model.disable_adapters(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=token_batch()).logits, base_logits, rtol=0, atol=0)
    assert (model(input_ids=token_batch()).logits - base_logits).abs().max() > 1e-4


def test_attribute_fallback_and_parameter_names():
    model = build("flan")
    assert model.config.model_type == "llama"  # the HF config through the wrapper
    names = [n for n, _ in model.named_parameters()]
    assert "base_model.model.layers.0.self_attn.q_proj.universal.A" in names
    assert "base_model.model.layers.0.self_attn.q_proj.experts.code.B" in names
    assert "base_model.model.layers.0.self_attn.q_proj.router.weight" in names
    assert model.expert_parameters("routers")[0].shape == (3, 32)


# ---- inference caches and the shared router GEMM -------------------------------------------


@pytest.mark.parametrize("variant", ["molora", "flan", "res"])
def test_inference_caches_follow_weight_updates(variant):
    """Stacked weights are cached between inference forwards; any in-place update (optimiser
    step, load_experts) must show up in the next forward."""
    model = build(variant)
    ids = token_batch()
    lyr = model.modula_layers()["model.layers.0.self_attn.q_proj"]
    targets = [lyr.router.weight, next(iter(lyr.experts.values())).A, next(iter(lyr.experts.values())).B]
    if lyr.universal is not None:
        targets += [lyr.universal.A, lyr.universal.B]
    with torch.no_grad():
        model(input_ids=ids)
        for t in targets:
            before = model(input_ids=ids).logits
            t.add_(torch.randn_like(t) * 0.5)
            after = model(input_ids=ids).logits
            assert (after - before).abs().max() > 1e-5
            model.kernel_backend = "reference"  # no cache: the truth
            torch.testing.assert_close(after, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
            model.kernel_backend = "auto"
        # pinned rows (the per-row path) see the updates too
        pinned = model(input_ids=ids, expert_ids=[0, 1, 0]).logits
        next(iter(lyr.experts.values())).B.mul_(2)
        assert (model(input_ids=ids, expert_ids=[0, 1, 0]).logits - pinned).abs().max() > 1e-5


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_dropout_applies_to_the_experts_not_the_router(variant):
    model = build(variant, dropout=0.5)
    model.train()
    ids = token_batch()
    path = "model.layers.1.self_attn.o_proj"
    with model.capture_gates(), torch.no_grad():
        torch.manual_seed(0)
        a = model(input_ids=ids).logits
        torch.manual_seed(1)
        b = model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4  # dropout is active on the adapters
    with model.capture_gates():
        lyr, x, _ = _layer_input_output(model, path, ids)  # x: this layer's input, this forward
    g = model.gate_weights()[path]
    torch.testing.assert_close(g, torch.softmax(x @ lyr.router.weight.t(), -1), rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
