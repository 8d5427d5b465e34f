"""Expert files: round trips, determinism, add-domain stability, and every failure mode."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from test_model_common import domains_for, layer_config, randomise_adapters, tiny_model, token_batch

from modula.model import (
    ExpertFileError,
    ModulaModel,
    attach_modula,
    base_model_fingerprint,
    load_expert,
    load_experts,
    load_modula,
    read_manifest,
    save_expert,
    save_experts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(variant="res", seed=0, family="llama", **kw) -> ModulaModel:
    model = attach_modula(tiny_model(family, seed), layer_config(variant, **kw), domains_for(variant))
    randomise_adapters(model, seed=seed + 10)
    return model


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=token_batch(), **kw).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "molora", "flan", "res"])
def test_round_trip_into_a_fresh_base(tmp_path, variant):
    model = build(variant)
    manifest = save_experts(model, tmp_path, "tiny-llama@test")
    files = sorted(p.name for p in tmp_path.iterdir())
    want = {
        "lora": ["manifest.json", "universal.safetensors"],
        "molora": ["domain-code.safetensors", "domain-math.safetensors", "manifest.json", "routers.safetensors"],
        "flan": ["domain-code.safetensors", "domain-math.safetensors", "manifest.json", "routers.safetensors", "universal.safetensors"],
    }
    want["res"] = want["flan"]
    assert files == want[variant]
    assert manifest["variant"] == variant and manifest["base_model"]["id"] == "tiny-llama@test"
    loaded = load_modula(tiny_model(seed=0), tmp_path)
    assert loaded.domains == model.domains and loaded.variant == variant
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    # load_experts with a plain model does the same
    again = load_experts(tiny_model(seed=0), tmp_path)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_load_into_an_existing_model(tmp_path):
    model = build("flan")
    save_experts(model, tmp_path, "base")
    other = attach_modula(tiny_model(seed=0), layer_config("flan"), ["code", "math"])
    assert (logits(other) - logits(model)).abs().max() > 1e-4
    assert load_experts(other, tmp_path) is other
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


def test_manifest_describes_the_files(tmp_path):
    model = build("res", router=None)
    manifest = save_experts(model, tmp_path, "base-id")
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    for key in ("format_version", "base_model", "variant", "universal_rank", "domain_rank",
                "universal_alpha", "domain_alpha", "target_modules", "domains", "dtype", "experts"):
        assert key in manifest
    assert manifest["universal_alpha"] == 16.0 and manifest["domain_alpha"] == 8.0  # alpha = 2r
    assert manifest["dtype"] == "float32"
    assert manifest["base_model"]["fingerprint"] == base_model_fingerprint(model)
    assert manifest["target_modules"][0] == "q_proj"
    for e in manifest["experts"]:
        data = (tmp_path / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["size"]
    assert read_manifest(tmp_path) == manifest


def test_saving_is_deterministic_and_skips_unchanged_files(tmp_path):
    model = build("flan")
    save_experts(model, tmp_path / "a", "base")
    save_experts(model, tmp_path / "b", "base")
    for f in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    stamps = {f: os.stat(tmp_path / "a" / f).st_ino for f in os.listdir(tmp_path / "a")}
    save_experts(model, tmp_path / "a", "base")
    for f, ino in stamps.items():
        if f != "manifest.json":
            assert os.stat(tmp_path / "a" / f).st_ino == ino, f"{f} was rewritten"


def test_add_domain_leaves_old_files_byte_identical(tmp_path):
    model = build("res")
    save_experts(model, tmp_path, "base")
    old = {f: ((tmp_path / f).read_bytes(), os.stat(tmp_path / f).st_ino) for f in os.listdir(tmp_path)}
    model.add_domain("units")
    manifest = save_experts(model, tmp_path, "base")
    for f in ("universal.safetensors", "domain-code.safetensors", "domain-math.safetensors"):
        assert (tmp_path / f).read_bytes() == old[f][0]
        assert os.stat(tmp_path / f).st_ino == old[f][1]  # not even rewritten
    assert (tmp_path / "routers.safetensors").read_bytes() != old["routers.safetensors"][0]
    assert (tmp_path / "domain-units.safetensors").is_file()
    assert manifest["domains"] == ["code", "math", "units"]
    loaded = load_modula(tiny_model(seed=0), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_removed_domain_file_is_deleted(tmp_path):
    model = build("flan")
    save_experts(model, tmp_path, "base")
    model.remove_domain("code")
    save_experts(model, tmp_path, "base")
    assert not (tmp_path / "domain-code.safetensors").exists()
    assert load_modula(tiny_model(seed=0), tmp_path).domains == ["math"]


def test_single_expert_file_round_trip(tmp_path):
    """A domain expert trained alone on a worker, shipped as one file, loaded elsewhere."""
    trained = build("res")
    info = save_expert(trained, "math", tmp_path / "math.safetensors")
    assert info["written"] and info["size"] == (tmp_path / "math.safetensors").stat().st_size
    assert not save_expert(trained, "math", tmp_path / "math.safetensors")["written"]
    fresh = attach_modula(tiny_model(seed=0), layer_config("res"), ["code", "math"])
    before = snapshot(fresh)
    load_expert(fresh, "math", tmp_path / "math.safetensors", sha256=info["sha256"])
    for n, p in fresh.named_parameters():
        if ".experts.math." in n:
            assert torch.equal(p, dict(trained.named_parameters())[n])
        else:
            assert torch.equal(p, before[n])
    with pytest.raises(ExpertFileError, match="holds a 'domain' expert, not 'universal'"):
        load_expert(fresh, "universal", tmp_path / "math.safetensors")
    with pytest.raises(ExpertFileError, match="no expert 'units'.*add_domain"):
        load_expert(fresh, "units", tmp_path / "math.safetensors")
    fresh.add_domain("units")  # a new domain takes a file trained for it
    load_expert(fresh, "units", tmp_path / "math.safetensors")
    with pytest.raises(ExpertFileError, match="checksum mismatch"):
        load_expert(fresh, "math", tmp_path / "math.safetensors", sha256="0" * 64)
    save_expert(trained, "routers", tmp_path / "routers.safetensors")
    with pytest.raises(ExpertFileError, match="routers saved for experts"):
        load_expert(fresh, "routers", tmp_path / "routers.safetensors")
    with pytest.raises(ValueError, match="unknown expert"):
        save_expert(trained, "law", tmp_path / "law.safetensors")


def test_single_expert_from_another_base_or_variant(tmp_path):
    save_expert(build("res", seed=0), "code", tmp_path / "code.safetensors")
    other_base = attach_modula(tiny_model(seed=1), layer_config("res"), ["code"])
    with pytest.raises(ExpertFileError, match="different base model"):
        load_expert(other_base, "code", tmp_path / "code.safetensors")
    flan = attach_modula(tiny_model(seed=0), layer_config("flan"), ["code"])
    with pytest.raises(ExpertFileError, match="variant 'res' in the file"):
        load_expert(flan, "code", tmp_path / "code.safetensors")
    narrower = attach_modula(tiny_model(seed=0), layer_config("res", target_modules=["q_proj"]), ["code"])
    with pytest.raises(ExpertFileError, match="other target modules"):
        load_expert(narrower, "code", tmp_path / "code.safetensors")


# ---- failure modes ------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    model = build("res")
    save_experts(model, tmp_path, "base")
    return model, tmp_path


def _unchanged_after_failure(model, fn, match):
    before = snapshot(model)
    with pytest.raises(ExpertFileError, match=match):
        fn()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed load"


def test_missing_file(saved):
    model, d = saved
    (d / "domain-math.safetensors").unlink()
    target = attach_modula(tiny_model(seed=0), layer_config("res"), ["code", "math"])
    _unchanged_after_failure(target, lambda: load_experts(target, d), r"domain-math.safetensors is missing")
    base = tiny_model(seed=0)
    with pytest.raises(ExpertFileError, match="is missing"):
        load_modula(base, d)
    assert not any(type(m).__name__ == "ModulaLinear" for m in base.modules())  # untouched


def test_checksum_mismatch(saved):
    model, d = saved
    path = d / "domain-code.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data, same size
    path.write_bytes(bytes(data))
    target = attach_modula(tiny_model(seed=0), layer_config("res"), ["code", "math"])
    _unchanged_after_failure(target, lambda: load_experts(target, d), "checksum mismatch for domain-code")


def test_size_mismatch(saved):
    _, d = saved
    with open(d / "universal.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExpertFileError, match="bytes, the manifest says"):
        load_modula(tiny_model(seed=0), d)


def test_other_base_model(saved):
    _, d = saved
    with pytest.raises(ExpertFileError, match="different base model"):
        load_modula(tiny_model(seed=1), d)
    other = attach_modula(tiny_model(seed=1), layer_config("res"), ["code", "math"])
    _unchanged_after_failure(other, lambda: load_experts(other, d), "different base model")
    load_experts(other, d, verify_base=False)  # an explicit override


def test_shape_mismatch(saved):
    """A file whose checksum is right but whose tensors do not fit the layers."""
    model, d = saved
    bigger = attach_modula(tiny_model(seed=0), layer_config("res", domain_rank=6), ["code", "math"])
    randomise_adapters(bigger)
    save_expert(bigger, "code", d / "domain-code.safetensors")
    manifest = json.loads((d / "manifest.json").read_text())
    for e in manifest["experts"]:
        if e["name"] == "code":
            data = (d / e["file"]).read_bytes()
            e["sha256"], e["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertFileError, match=r"shape mismatch for .*\.A: file has \(6, 32\), the model needs \(4, 32\)"):
        load_modula(tiny_model(seed=0), d)


def test_model_with_other_ranks_or_targets_or_domains(saved):
    _, d = saved
    wrong_rank = attach_modula(tiny_model(seed=0), layer_config("res", universal_rank=4), ["code", "math"])
    with pytest.raises(ExpertFileError, match="universal_rank is 8 in the files but 4"):
        load_experts(wrong_rank, d)
    wrong_targets = attach_modula(tiny_model(seed=0), layer_config("res", target_modules=["q_proj"]), ["code", "math"])
    with pytest.raises(ExpertFileError, match="target modules differ"):
        load_experts(wrong_targets, d)
    wrong_order = attach_modula(tiny_model(seed=0), layer_config("res"), ["math", "code"])
    with pytest.raises(ExpertFileError, match="router order"):
        load_experts(wrong_order, d)
    wrong_variant = attach_modula(tiny_model(seed=0), layer_config("flan"), ["code", "math"])
    with pytest.raises(ExpertFileError, match="variant is 'res' in the files but 'flan'"):
        load_experts(wrong_variant, d)
    gpt2 = tiny_model("gpt2", seed=0)
    with pytest.raises(ExpertFileError):
        load_modula(gpt2, d, verify_base=False)


def test_manifest_problems(saved):
    _, d = saved
    good = (d / "manifest.json").read_text()
    cases = {
        "not valid JSON": "{",
        "field 'domains' is missing": json.dumps({k: v for k, v in json.loads(good).items() if k != "domains"}),
        "format_version 99 is not supported": good.replace('"format_version": 1', '"format_version": 99'),
        "unsafe file": good.replace('"file": "universal.safetensors"', '"file": "../universal.safetensors"'),
        "not a modula-experts manifest": json.dumps({"format": "other"}),
        "invalid domain name '../x'": good.replace('"code"', '"../x"', 1),
    }
    for match, text in cases.items():
        (d / "manifest.json").write_text(text)
        with pytest.raises(ExpertFileError, match=match):
            load_modula(tiny_model(seed=0), d)
    (d / "manifest.json").unlink()
    with pytest.raises(ExpertFileError, match="missing manifest"):
        read_manifest(d)


def test_not_a_safetensors_file(saved):
    _, d = saved
    path = d / "routers.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    manifest = json.loads((d / "manifest.json").read_text())
    for e in manifest["experts"]:
        if e["name"] == "routers":
            e["sha256"], e["size"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertFileError, match="not a valid safetensors file"):
        load_modula(tiny_model(seed=0), d)


def test_nothing_is_unpickled(saved, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, d = saved
    loaded = load_modula(tiny_model(seed=0), d)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_expert_file_error_is_a_value_error():
    assert issubclass(ExpertFileError, ValueError)


# ---- fingerprint --------------------------------------------------------------------------


def test_fingerprint_sees_through_modula_and_tracks_the_weights():
    base = tiny_model(seed=0)
    fp = base_model_fingerprint(base)
    assert fp.startswith("sha256:") and fp == base_model_fingerprint(tiny_model(seed=0))
    model = build("res")
    assert base_model_fingerprint(model) == fp  # adapters are not part of the base
    with torch.no_grad():
        model.base_model.model.layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    assert base_model_fingerprint(model) != fp
    assert base_model_fingerprint(tiny_model(seed=1)) != fp


def test_fingerprint_of_large_tensors_is_sampled_but_sensitive():
    big = torch.nn.Linear(1024, 512, bias=False)  # 2 MiB: sampled
    fp = base_model_fingerprint(big)
    with torch.no_grad():
        big.weight[0, 0] += 1.0  # the first chunk is always hashed
    assert base_model_fingerprint(big) != fp
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # so is the last
    fp2 = base_model_fingerprint(big)
    with torch.no_grad():
        big.weight[-1, -1] -= 1.0
    assert base_model_fingerprint(big) != fp2


# ---- the Res input option ---------------------------------------------------------------------


def test_res_input_norm_round_trips_and_is_checked(tmp_path):
    """Res experts trained to read h / RMS(h) load only into a model that normalises too, and
    a manifest from before the option reads as 'none'."""
    model = build("res", res_input_norm="rms")
    plain = build("res")  # same weights (same seeds), experts read h as is
    assert (logits(model) - logits(plain)).abs().max() > 1e-4  # the option changes the layer
    manifest = save_experts(model, tmp_path / "rms", "base")
    assert manifest["res_input_norm"] == "rms"
    loaded = load_modula(tiny_model(seed=0), tmp_path / "rms")
    assert loaded.modula_config.res_input_norm == "rms"
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    with pytest.raises(ExpertFileError, match="res_input_norm is 'rms' in the files"):
        load_experts(attach_modula(tiny_model(seed=0), layer_config("res"), ["code", "math"]),
                     tmp_path / "rms")
    save_expert(model, "math", tmp_path / "math.safetensors")
    with pytest.raises(ExpertFileError, match="trained to read res_input_norm='rms'"):
        load_expert(attach_modula(tiny_model(seed=0), layer_config("res"), ["code", "math"]),
                    "math", tmp_path / "math.safetensors")
    # an older manifest (no field) is a model whose experts read h as is
    save_experts(plain, tmp_path / "old", "base")
    path = tmp_path / "old" / "manifest.json"
    old = json.loads(path.read_text())
    del old["res_input_norm"]
    path.write_text(json.dumps(old))
    again = load_modula(tiny_model(seed=0), tmp_path / "old")
    assert again.modula_config.res_input_norm == "none"
    torch.testing.assert_close(logits(again), logits(plain), rtol=0, atol=0)


def test_res_input_norm_trains_the_domain_expert():
    """The domain stage's gradients reach the expert through the normalised input and match
    the reference kernel's."""
    grads = {}
    for backend in ("reference", "stacked"):
        model = build("res", res_input_norm="rms", kernel=backend)
        model.set_stage("domain:math")
        out = model(input_ids=token_batch(), labels=token_batch())
        out.loss.backward()
        grads[backend] = [p.grad.clone() for p in model.expert_parameters("math")]
        assert all(float(g.abs().max()) > 0 for g in grads[backend])
    for a, b in zip(grads["reference"], grads["stacked"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
