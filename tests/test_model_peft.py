"""PEFT interop (logits equal to PEFT's own within 1e-5 in fp32) and merging into the base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_model_common import domains_for, layer_config, randomise_adapters, tiny_model, token_batch

from modula.model import (
    ModulaLinear,
    attach_modula,
    export_peft,
    import_peft,
    merge_into_base,
)

# raised inside PEFT's own calls into transformers 5, not by this project
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(variant, family="llama", **kw):
    model = attach_modula(tiny_model(family, 0), layer_config(variant, **kw), domains_for(variant))
    randomise_adapters(model, seed=4)
    return model


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=token_batch(), **kw).logits


# ---- export ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,expert,family",
    [
        ("flan", "universal", "llama"),
        ("flan", "math", "llama"),
        ("res", "universal", "llama"),
        ("lora", "universal", "gpt2"),  # Conv1D: fan_in_fan_out
        ("molora", "code", "gpt_neox"),
    ],
)
def test_exported_adapter_matches_peft(tmp_path, variant, expert, family):
    model = build(variant, family)
    export_peft(model, expert, tmp_path, base_model_id="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny"
    peft_model = PeftModel.from_pretrained(tiny_model(family, 0), str(tmp_path)).eval()
    model.force_domain(expert)
    ours = logits(model)
    theirs = logits(peft_model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the adapter really does something (the base alone differs)
    assert (theirs - logits(tiny_model(family, 0))).abs().max() > 1e-3


def test_res_domain_experts_are_not_exportable(tmp_path):
    with pytest.raises(ValueError, match="LeakyReLU"):
        export_peft(build("res"), "code", tmp_path)
    with pytest.raises(ValueError, match="no universal"):
        export_peft(build("molora"), "universal", tmp_path)
    with pytest.raises(ValueError, match="unknown expert"):
        export_peft(build("flan"), "law", tmp_path)


# ---- import ------------------------------------------------------------------------------


def _peft_adapter(tmp_path, family="llama", **lora):
    peft_model = get_peft_model(tiny_model(family, 0), LoraConfig(**lora))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path))
    return peft_model.eval()


@pytest.mark.parametrize(
    "lora",
    [
        # lower rank than domain_rank (zero-padded), another alpha, all targets
        dict(r=2, lora_alpha=7, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        # rsLoRA scaling, a rank pattern, only some layers targeted
        dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 3}),
    ],
)
def test_imported_adapter_matches_peft(tmp_path, lora):
    peft_model = _peft_adapter(tmp_path, **lora)
    model = build("flan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    import_peft(model, tmp_path, "finance")
    assert model.domains == ["code", "math", "finance"]
    for n, p in model.named_parameters():
        if n.startswith("request_router.head."):
            # one more class (the new domain); the existing classes' rows are kept
            assert p.shape[0] == before[n].shape[0] + 1, n
            assert torch.equal(p[:-1], before[n]), n
        elif n in before and not n.endswith("router.weight"):
            assert torch.equal(p, before[n]), n  # existing experts untouched
    model.force_domain("finance")
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=1e-5)


def test_import_refusals(tmp_path):
    _peft_adapter(tmp_path / "a", r=8, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank 8 > domain_rank 4"):
        import_peft(build("flan"), tmp_path / "a", "finance")
    with pytest.raises(ValueError, match="variant 'res' cannot take a PEFT adapter"):
        import_peft(build("res"), tmp_path / "a", "finance")
    with pytest.raises(ValueError, match="already exists"):
        import_peft(build("flan"), tmp_path / "a", "code")
    _peft_adapter(tmp_path / "b", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(build("flan"), tmp_path / "b", "finance")
    pickled = tmp_path / "c"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle and is not loaded"):
        import_peft(build("flan"), pickled, "finance")
    narrower = build("flan", target_modules=["v_proj"])
    with pytest.raises(ValueError, match="does not adapt"):
        import_peft(narrower, tmp_path / "a", "finance")
    assert narrower.domains == ["code", "math"]  # a refused import leaves no trace


# ---- merging -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,expert,family",
    [
        ("lora", "universal", "llama"),
        ("flan", "universal", "llama"),
        ("flan", "code", "llama"),
        ("res", "universal", "llama"),
        ("molora", "math", "qwen2"),
        ("flan", "math", "gpt2"),  # Conv1D weights are in x out
    ],
)
def test_merged_model_equals_the_forced_expert(variant, expert, family):
    model = build(variant, family)
    merged = merge_into_base(model, expert)
    assert not any(isinstance(m, ModulaLinear) for m in merged.modules())
    assert type(merged) is type(tiny_model(family, 0))
    model.force_domain(expert)
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-5)
    # the source model is unchanged and still has its adapters
    with model.disable_adapters():
        torch.testing.assert_close(logits(model), logits(tiny_model(family, 0)), rtol=0, atol=0)
    assert (logits(merged) - logits(tiny_model(family, 0))).abs().max() > 1e-3


def test_merging_refuses_nonlinear_or_unknown_experts():
    with pytest.raises(ValueError, match="not linear in x"):
        merge_into_base(build("res"), "code")
    with pytest.raises(ValueError, match="no universal"):
        merge_into_base(build("molora"), "universal")
    with pytest.raises(ValueError, match="unknown expert"):
        merge_into_base(build("flan"), "law")
