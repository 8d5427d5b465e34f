"""Base model families end to end: a tiny random model of each family, saved locally with a
tokenizer built here, is trained on Ray Train, published, and serves a request. Families the
engine cannot serve are refused up front, with the reason.

Cost: Qwen2 goes through everything (MoDULA-Res's three stages, then the real ``modula serve
--detach`` and an OpenAI request over HTTP). The other families train one Ray Train run each
(``modula.variant: molora``: every expert and the routers jointly, the mixture in the path) and
serve through the replica's own code in-process (``ModelSource`` loading the registry's latest
version, the continuous-batching engine, token for token against HF generate): a Serve
deployment and three runs per family would add minutes each for the same code paths.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serving_fixtures import ensure_serve, make_base_model, release_serve, wait_ready

from modula.config import config_from_dict
from modula.model.families import TESTED_FAMILIES, UnsupportedBaseModel, check_family

SPLITS = {"train": 24, "validation": 4, "test": 4}
SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config(name: str):
    """A tiny random config of the family; sliding windows shorter than the training rows."""
    import transformers as T

    if name == "qwen2":
        return T.Qwen2Config(**SMALL)
    if name == "mistral":
        return T.MistralConfig(**SMALL, sliding_window=8)
    if name == "gemma":
        return T.GemmaConfig(**SMALL, head_dim=8)
    if name == "gemma2":
        return T.Gemma2Config(**SMALL, head_dim=8, sliding_window=8)
    if name == "gemma3_text":
        return T.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"])
    if name == "phi3":
        return T.Phi3Config(**SMALL)
    raise KeyError(name)


def config(root, base, family: str, switches: bool, variant: str, **serve):
    stage = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2,
             "max_failures": 0, "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    if switches:  # the training-at-scale switches, on every family's own decoder layers
        stage |= {"precision": "bf16", "gradient_checkpointing": True, "grad_accum_steps": 2}
    name = "fam-" + family.replace("_", "-")
    return config_from_dict({
        "storage": {"root": str(root)},
        "cluster": {"dashboard": False},
        "model": {"base": str(base), "max_length": 48},
        "modula": {"variant": variant, "universal_rank": 4, "domain_rank": 2},
        "domains": [{"name": "general", "metric": "perplexity", "splits": SPLITS},
                    {"name": "math", "splits": SPLITS}],
        "stages": {s: dict(stage) for s in ("universal", "domain", "router", "molora")},
        "serve": {"model_name": name, "app_name": name, "route_prefix": f"/{name}",
                  "max_prompt_tokens": 32, "max_tokens_limit": 8, "registry_poll_s": 60,
                  "resources": {"num_cpus": 1}, **serve},
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One storage root for every family (the data is built once; models differ by name)."""
    return tmp_path_factory.mktemp("families-root")


def train_family(tmp_path, root, family: str, switches: bool = True, variant: str = "molora",
                 **serve):
    from modula.trainers.runner import train

    base = tmp_path / family
    make_base_model(base, config=family_config(family))
    cfg = config(root, base, family, switches, variant, **serve)
    costs = train(cfg, "all", show_progress=False)
    stages = ["universal", "domains", "router"] if variant == "res" else ["molora"]
    assert [c.stage for c in costs] == stages
    assert all(c.effective_batch == (4 if switches else 2) for c in costs)
    return cfg


def serve_in_process(cfg) -> None:
    """One pinned request through the replica's loading code and the engine, token for token
    against HF generate on the same model."""
    from modula.serving.engine import EngineCore, Finished
    from modula.serving.modeling import ModelSource
    from modula.serving.protocol import GenerationRequest, SamplingParams

    source = ModelSource(cfg)
    adapter = source.load(source.latest_version())
    tok = source.tokenizer()
    prompt = tok("What is 3 plus 4?")["input_ids"]
    events = []
    core = EngineCore(adapter, tok, max_running=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    core.add(GenerationRequest("r0", tuple(prompt), params, "math"), adapter.expert_id("math"),
             events.append)
    while core.has_work():
        core.step()
    (done,) = [e for e in events if isinstance(e, Finished)]
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        want = adapter.model.generate(ids, expert_ids=[0], max_new_tokens=6, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert done.result.token_ids == want.tolist()
    assert done.result.domain == "math" and adapter.info["variant"] == cfg.modula.variant


# ------------------------------------------------------------------------------ unit


@pytest.mark.parametrize("model_type, extra, why", [
    ("mamba", {}, "state-space (Mamba) layers"),
    ("jamba", {"layer_types": ["mamba", "full_attention"]}, "state-space"),
    ("qwen3_next", {}, "linear-attention"),
    ("lfm2", {}, "short-convolution"),
    ("llama4_text", {"layer_types": ["chunked_attention", "full_attention"]},
     "layer types chunked_attention"),
    ("t5", {"is_encoder_decoder": True}, "encoder-decoder"),
])
def test_families_the_engine_cannot_serve_are_refused(model_type, extra, why):
    with pytest.raises(UnsupportedBaseModel) as info:
        check_family({"model_type": model_type, **extra}, where="model.base /m")
    assert f"model.base /m: the {model_type!r} family is not supported" in str(info.value)
    assert why in str(info.value)
    for ok in [*TESTED_FAMILIES, "some_new_llama"]:
        assert check_family({"model_type": ok, "layer_types": ["sliding_attention"]}) == ok


def test_refused_before_any_work(tmp_path, monkeypatch):
    """`modula train` and `modula serve` stop on such a base before Ray or a download starts;
    a max_length beyond the model's context is a clear error too."""
    from transformers import MambaConfig
    from typer.testing import CliRunner

    from modula.cli import app

    make_base_model(tmp_path / "mamba", config=MambaConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=4))
    make_base_model(tmp_path / "qwen2", config=family_config("qwen2"))
    runner = CliRunner()
    ray_started = []
    monkeypatch.setattr("ray.init", lambda *a, **k: ray_started.append(1))
    for command in (["train", "--stage", "universal"], ["serve"]):
        res = runner.invoke(app, [*command, "--set", f"storage.root={tmp_path / 'runs'}",
                                  "--set", f"model.base={tmp_path / 'mamba'}"])
        assert res.exit_code == 1, res.output
        assert "the 'mamba' family is not supported: it has state-space (Mamba) layers" \
            in res.output
        assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--stage", "universal",
                              "--set", f"storage.root={tmp_path / 'runs'}",
                              "--set", f"model.base={tmp_path / 'qwen2'}",
                              "--set", "model.max_length=64",
                              "--set", "stages.universal.max_length=256"])
    assert res.exit_code == 1
    assert "stages.universal.max_length: 256 tokens is beyond the context" in res.output
    assert "max_position_embeddings = 128" in res.output
    assert not ray_started


def test_default_targets_of_each_family(tmp_path):
    from transformers import AutoModelForCausalLM

    from modula.config import ModulaLayerConfig
    from modula.model import attach_modula

    for family in ("qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"):
        base = AutoModelForCausalLM.from_config(family_config(family))
        model = attach_modula(base, ModulaLayerConfig(), ["a"])
        leaves = {p.rsplit(".", 1)[-1] for p in model.modula_layers()}
        want = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3" else \
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert leaves == want, family
        assert len(model.modula_layers()) == 2 * len(want)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.integration
@pytest.mark.parametrize("family", [
    # gemma2 (sliding windows, soft-capping) in make test; the others in make test-slow
    pytest.param("mistral", marks=pytest.mark.slow), pytest.param("gemma", marks=pytest.mark.slow),
    "gemma2", pytest.param("gemma3_text", marks=pytest.mark.slow),
    pytest.param("phi3", marks=pytest.mark.slow)])
def test_family_trains_publishes_and_serves(family, tmp_path, root, ray_local):
    """One joint run (bf16, checkpointing, 2 micro-batches; Mistral plain fp32), the published
    version served in-process."""
    cfg = train_family(tmp_path, root, family, switches=family != "mistral")
    serve_in_process(cfg)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_qwen2_through_modula_serve_over_http(tmp_path, root, ray_local):
    """Qwen2 (biased q/k/v) trained with bf16 + checkpointing + accumulation, then the real
    `modula serve --detach` and one OpenAI chat request over HTTP."""
    import yaml
    from typer.testing import CliRunner

    from modula.cli import app

    port = ensure_serve()
    cfg = train_family(tmp_path, root, "qwen2", variant="res", port=port)
    path = tmp_path / "qwen2.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["serve", "--detach", "--config", str(path)])
    try:
        assert res.exit_code == 0, res.output
        assert "serving fam-qwen2 v1 (res, domains: math)" in res.output
        url = f"http://127.0.0.1:{port}/fam-qwen2"
        wait_ready(url)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, content=json.dumps({
            "model": "fam-qwen2:math", "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert body["modula"]["domain"] == "math" and body["modula"]["version"] == 1
    finally:
        release_serve(cfg.serve.app_name)
