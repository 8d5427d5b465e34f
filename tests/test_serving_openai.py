"""The endpoint in the OpenAI dialect evaluation tools speak, on real Ray Serve over loopback
HTTP: log probabilities (completions with echo, chat, streaming) equal to the served model's
own forward; batches of prompts and token ids, n, long stop lists, vLLM's sampling extensions,
chat messages with extra keys; the tokenizer routes; per-request expert weights; every bad
input a 4xx after which the service keeps answering; lm-evaluation-harness's
``local-completions`` running a multiple-choice and a ``generate_until`` task; a merged export
equal to the pinned domain served; a PEFT adapter made with ``peft`` imported with
``add-domain --from-peft`` and served.

One application: a tiny random Llama base with MoDULA-Flan experts published to a local
registry, one expert replica, an API key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serving_fixtures import (
    DOMAINS,
    deploy_published,
    release_serve,
    serving_config,
    shared_base_dir,
)

pytestmark = pytest.mark.integration

APP = "svc-openai"
KEY = "sk-modula-eval-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = 1e-4


@dataclass
class Service:
    url: str
    cfg: Any
    model: Any
    version: int
    tokenizer: Any
    base_dir: Path


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from modula.data.tokenizer import load_tokenizer

    base = shared_base_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("openai-root")
    stage = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    cfg = serving_config(root, base, variant="flan", stages={"router": stage},
                         splits={"train": 24, "validation": 4, "test": 4},
                         app_name=APP, route_prefix=f"/{APP}", api_keys=[KEY],
                         max_n=4, max_batch_prompts=8, max_logprobs=5, max_stop_sequences=16,
                         gate_report="prompt")
    url, version, model = deploy_published(cfg, APP, AUTH, seed=2)
    model.eval()
    yield Service(url, cfg, model, version, load_tokenizer(base), base)
    release_serve(APP)


@pytest.fixture(scope="module")
def client(service):
    import openai

    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(service: Service, path: str, body: Any, headers: dict[str, str] | None = AUTH
         ) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, headers=headers, timeout=60)


def ids_of(service: Service, text: str) -> list[int]:
    return list(service.tokenizer(text)["input_ids"])


def reference(service: Service, ids: list[int], **routing) -> torch.Tensor:
    """log-softmax (S, V) of the in-process copy of the served model, float32."""
    with torch.inference_mode():
        out = service.model(input_ids=torch.tensor([ids]), **routing)
    return torch.log_softmax(out.logits[0].float(), -1)


def assert_prompt_logprobs(lp: dict[str, Any], ids: list[int], ref: torch.Tensor) -> None:
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = lp["token_logprobs"][1:n]
    want = [float(ref[j - 1, ids[j]]) for j in range(1, n)]
    assert got == pytest.approx(want, abs=TOL)


# ------------------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("model,ext,routing", [
    ("modula", None, {}),
    ("modula:math", None, {"expert_ids": [1]}),
    ("modula", {"weights": {"math": 3, "units": 1}},
     {"expert_weights": torch.tensor([[0.0, 0.0, 0.75, 0.25]])}),
    ("modula", {"domains": ["code", "units"]},
     {"expert_mask": torch.tensor([[False, True, False, True]])}),
])
def test_echo_logprobs_equal_the_served_model(client, service, model, ext, routing):
    """``echo`` + ``logprobs``: every prompt token's log probability equals a forward of the
    same model with the same routing (routed, pinned, per-request weights, restricted)."""
    prompt = ids_of(service, "Numbers and arithmetic operations are described")
    r = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=3,
                                  extra_body={"modula": ext} if ext else None)
    lp = r.choices[0].logprobs
    ref = reference(service, prompt, **routing)
    assert len(lp.tokens) == len(prompt) + 3 == len(lp.text_offset)
    assert_prompt_logprobs(lp.model_dump(), prompt, ref)
    assert r.choices[0].text.startswith(service.tokenizer.decode(prompt,
                                                                 skip_special_tokens=True))
    for j in range(len(prompt), len(prompt) + 3):  # greedy: each chosen token is the best
        assert lp.token_logprobs[j] == pytest.approx(max(lp.top_logprobs[j].values()))
        assert len(lp.top_logprobs[j]) <= 4
    first = lp.token_logprobs[len(prompt)]
    assert first == pytest.approx(float(ref[-1].max()), abs=TOL)
    ext_out = r.model_extra["modula"]
    mode = "pinned" if model != "modula" else next(iter(ext)) if ext else "routed"
    assert ext_out["routing"]["mode"] == mode
    if ext and "weights" in ext:
        assert ext_out["gates"] == pytest.approx({"universal": 0.0, "code": 0.0, "math": 0.75,
                                                  "units": 0.25}, abs=1e-5)
        assert ext_out["routing"]["weights"] == {"math": 0.75, "units": 0.25}
    if ext and "domains" in ext:
        assert ext_out["gates"]["universal"] == pytest.approx(0.0, abs=1e-6)
        assert ext_out["gates"]["math"] == pytest.approx(0.0, abs=1e-6)


def test_loglikelihood_request_as_lm_eval_sends_it(service):
    """lm-eval's loglikelihood body: token-id prompts in a batch, echo, logprobs 1,
    max_tokens 1, temperature 0; choices come back by index, the scores equal the model's."""
    prompts = [ids_of(service, t) for t in ("The quick brown fox", "Class definitions",
                                            "In Python, a function is")]
    body = {"model": "modula", "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = post(service, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for c, ids in zip(out["choices"], prompts, strict=True):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then one token
        assert_prompt_logprobs(lp, ids, reference(service, ids))
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        assert c["modula"]["routing"]["mode"] == "routed"
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    # max_tokens 0 with echo scores the prompt alone
    r = post(service, "/v1/completions", {**body, "prompt": prompts[0], "max_tokens": 0})
    c = r.json()["choices"][0]
    assert len(c["logprobs"]["tokens"]) == len(prompts[0]) and c["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0


def test_chat_logprobs_streaming_and_not(client):
    msgs = [{"role": "user", "content": "Tell me about lists."}]
    plain = client.chat.completions.create(model="modula:code", messages=msgs, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = plain.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
               for e in content)
    chunks = list(client.chat.completions.create(
        model="modula:code", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == \
        [(e.token, round(e.logprob, 5)) for e in content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content


def test_completion_logprobs_streaming_and_not(client, service):
    kw = {"model": "modula", "prompt": "Class definitions", "max_tokens": 7, "temperature": 0,
          "logprobs": 2, "echo": True}
    plain = client.completions.create(**kw).choices[0]
    parts = list(client.completions.create(**kw, stream=True))
    tokens = [t for p in parts if p.choices and p.choices[0].logprobs
              for t in p.choices[0].logprobs.tokens]
    values = [v for p in parts if p.choices and p.choices[0].logprobs
              for v in p.choices[0].logprobs.token_logprobs]
    offsets = [v for p in parts if p.choices and p.choices[0].logprobs
               for v in p.choices[0].logprobs.text_offset]
    assert tokens == plain.logprobs.tokens
    assert values[0] is None and plain.logprobs.token_logprobs[0] is None
    assert values[1:] == pytest.approx(plain.logprobs.token_logprobs[1:], abs=1e-6)
    assert offsets == plain.logprobs.text_offset
    assert "".join(p.choices[0].text for p in parts if p.choices) == plain.text


# ------------------------------------------------------------------------------ batches


def test_batches_n_and_sampling_extensions(client, service):
    r = client.completions.create(model="modula", prompt=["The quick", "Class", "x"],
                                  max_tokens=4, temperature=0.9, seed=5, n=2,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "min_tokens": 2, "ignore_eos": True,
                                              "stop_token_ids": [2]})
    assert [c.index for c in r.choices] == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)
    again = client.completions.create(model="modula", prompt=["The quick", "Class", "x"],
                                      max_tokens=4, temperature=0.9, seed=5, n=2,
                                      extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                  "min_tokens": 2, "ignore_eos": True,
                                                  "stop_token_ids": [2]})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded
    single = client.completions.create(model="modula", prompt="Class", max_tokens=4,
                                       temperature=0.9, seed=5,
                                       extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "min_tokens": 2, "ignore_eos": True,
                                                   "stop_token_ids": [2]})
    assert single.choices[0].text == r.choices[2].text  # choice j of a prompt: seed + j
    assert r.usage.prompt_tokens == sum(len(ids_of(service, p)) for p in
                                        ("The quick", "Class", "x"))
    # streaming a batch: every choice ends, each with its own index
    parts = list(client.completions.create(model="modula", prompt=["a", "b"], max_tokens=3,
                                           temperature=0, stream=True, n=2))
    ends = sorted(p.choices[0].index for p in parts if p.choices and p.choices[0].finish_reason)
    assert ends == [0, 1, 2, 3]


def test_long_stop_lists_chat_extras_and_unknown_fields(service):
    stops = [f"never-{i}" for i in range(10)]
    r = post(service, "/v1/completions", {"model": "modula", "prompt": "def f", "max_tokens": 5,
                                          "stop": stops, "until": ["x"], "do_sample": False})
    assert r.status_code == 200, r.text
    assert r.json()["modula"]["ignored_fields"] == ["until", "do_sample"]
    chat = {"model": "modula", "max_tokens": 4, "temperature": 0, "stop": stops[:8],
            "messages": [{"role": "system", "content": "Be brief.", "type": "text"},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                      {"type": "text", "text": " there"}],
                          "name": "u1", "extra": {"a": 1}}]}
    r = post(service, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_tokenizer_routes(service):
    tok = service.tokenizer
    r = post(service, "/tokenize", {"prompt": "The quick brown fox", "add_special_tokens": False})
    assert r.json()["tokens"] == tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] > 0
    r = post(service, "/tokenize", {"model": "modula", "prompt": "hi", "return_token_strs": True})
    assert r.json()["tokens"][0] == tok.bos_token_id and r.json()["token_strs"][0] == "<s>"
    r = post(service, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert tok.decode(r.json()["tokens"]).endswith("<|assistant|>\n")
    r = post(service, "/detokenize", {"tokens": r.json()["tokens"]})
    assert "<|user|>" in r.json()["prompt"]
    info = httpx.get(f"{service.url}/tokenizer_info", headers=AUTH, timeout=30).json()
    assert info["eos_token"] == "</s>" and "assistant" in info["chat_template"]
    assert httpx.get(f"{service.url}/tokenizer_info", timeout=30).status_code == 401
    assert post(service, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert post(service, "/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


# ------------------------------------------------------------------------------ bad input

GOOD = {"model": "modula", "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {**GOOD, "logprobs": 6}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "modula", "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 9}, 400, "top_logprobs"),
    ("/v1/completions", {**GOOD, "n": 5}, 400, "n"),
    ("/v1/completions", {**GOOD, "prompt": ["a"] * 9}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a"] * 3, "n": 3}, 400, "n"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2], [3, 10**7]]}, 400, "prompt.1"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2], []]}, 400, "prompt.1"),
    ("/v1/completions", {**GOOD, "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [10**7]}, 400, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "modula": {"weights": {"finance": 1}}}, 404, "modula.weights"),
    ("/v1/completions", {**GOOD, "modula": {"domains": ["math", "finance"]}}, 404,
     "modula.domains"),
    ("/v1/completions", {**GOOD, "modula": {"weights": {"math": -1}}}, 400,
     "modula.weights.math"),
    ("/v1/completions", {**GOOD, "modula": {"weights": {"math": 0, "code": 0}}}, 400,
     "modula.weights"),
    ("/v1/completions", {**GOOD, "model": "modula:math", "modula": {"domains": ["math"]}}, 400,
     "modula"),
    ("/v1/completions", {**GOOD, "stream": True, "modula": {"weights": {"finance": 1}}}, 404,
     "modula.weights"),
    ("/v1/chat/completions", {"model": "modula", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
])
def test_bad_input_then_the_service_keeps_serving(service, path, body, status, param):
    r = post(service, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    ok = post(service, "/v1/completions", GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]


def test_nan_weights_are_refused(service):
    raw = b'{"model": "modula", "prompt": "x", "modula": {"weights": {"math": NaN}}}'
    r = httpx.post(f"{service.url}/v1/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "modula.weights.math"


# ------------------------------------------------------------------------------ lm-eval


MC_TASK = """task: modula_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_TASK = """task: modula_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:", "</s>", "<|user|>", "def ", "class ", "if ", "print("]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_harness_runs_against_the_endpoint(service, tmp_path):
    """lm-evaluation-harness's ``local-completions`` (the remote tokenizer through
    ``/tokenizer_info`` and ``/tokenize``, batches of 3): a multiple-choice task (loglikelihood
    with echo + logprobs) and a generate_until task (8 stop strings), on files written here,
    offline. The accuracy equals the one computed from the served model directly."""
    pytest.importorskip("lm_eval")
    questions = [("Convert 3 km to m.", ["3000 m", "30 m", "3 m"], 0),
                 ("Add 2 and 3.", ["5", "6", "23"], 0),
                 ("The opposite of up is", [" down", " left", " green"], 0),
                 ("Python lists are", [" mutable", " frozen", " constant"], 0),
                 ("2 + 2 =", [" 4", " 5", " 22"], 0)]
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                          for q, c, a in questions))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": f"Question: {q}\nAnswer:", "answer": c[a]})
                           + "\n" for q, c, a in questions))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=mc))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=gen))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": KEY,
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf")}
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model=modula,base_url={service.url}/v1/completions,"
                            f"auth_token={KEY},max_gen_toks=8,max_length=96,"
                            "num_concurrent=1,max_retries=1",
            "--batch_size", "3",
            "--tasks", "modula_mc,modula_gen", "--include_path", str(tasks),
            "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result,) = list(out.rglob("results_*.json"))
    res = json.loads(result.read_text())["results"]
    acc = res["modula_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and "exact_match,none" in res["modula_gen"]
    # the accuracy lm-eval computed from the endpoint equals the served model's own choice
    want = []
    for q, choices, a in questions:
        scores = []
        ctx = service.tokenizer(q, add_special_tokens=False)["input_ids"]
        for c in choices:
            whole = service.tokenizer(q + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ref = reference(service, whole)
            scores.append(sum(float(ref[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        want.append(max(range(len(scores)), key=scores.__getitem__) == a)
    assert acc == pytest.approx(sum(want) / len(want))


# ------------------------------------------------------------------------------ artifacts


def test_merged_export_equals_the_pinned_domain_served(service, tmp_path):
    """``modula export --format merged --expert math`` loads with plain transformers and gives
    the log probabilities the service gives for ``modula:math``; the PEFT export loads with
    peft; a Res-only request (none here) aside, every expert of Flan exports."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modula.model.export import ExportError, export_model

    merged = export_model(service.cfg, tmp_path / "merged", fmt="merged", experts=["math"])
    plain = AutoModelForCausalLM.from_pretrained(merged.directory, dtype=torch.float32)
    ids = ids_of(service, "Numbers and arithmetic operations are described here")
    with torch.inference_mode():
        ref = torch.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    r = post(service, "/v1/completions", {"model": "modula:math", "prompt": ids,
                                          "max_tokens": 0, "echo": True, "logprobs": 1})
    assert_prompt_logprobs(r.json()["choices"][0]["logprobs"], ids, ref)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()

    peft_dir = export_model(service.cfg, tmp_path / "peft")
    assert sorted(peft_dir.experts) == sorted(["universal", *DOMAINS])
    base = AutoModelForCausalLM.from_pretrained(service.base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(peft_dir.experts["code"]))
    with torch.inference_mode():
        got = torch.log_softmax(pm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = reference(service, ids, expert_ids=[0])
    assert torch.allclose(got, want, atol=TOL)
    with pytest.raises(ExportError, match="exactly one"):
        export_model(service.cfg, tmp_path / "m2", fmt="merged", experts=["math", "code"])
    with pytest.raises(ExportError, match="not an empty folder"):
        export_model(service.cfg, tmp_path / "peft")
    with pytest.raises(ExportError, match="unknown expert"):
        export_model(service.cfg, tmp_path / "m3", fmt="merged", experts=["finance"])


def make_peft_adapter(base_dir: Path, dest: Path, seed: int = 0, **lora: Any) -> Any:
    """A LoRA adapter made with peft itself on the base model, with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=lora.pop("r", 4), lora_alpha=lora.pop("lora_alpha", 8),
                     target_modules=lora.pop("target_modules", ["q_proj", "v_proj", "down_proj"]),
                     task_type="CAUSAL_LM", **lora)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(dest))
    pm.eval()
    return pm


def test_peft_import_refusals(service, tmp_path):
    """--from-peft refuses, before writing anything: a pickle-only adapter, an adapter for
    another base model (by name) or for other shapes, a Res model."""
    from modula.infra.registry import Registry
    from modula.infra.storage import Storage
    from modula.trainers.common import PlanError
    from modula.trainers.runner import import_peft_expert

    storage = Storage(service.cfg.storage)
    local = Registry.from_config(service.cfg).fetch("modula", service.version, tmp_path / "v")
    good = tmp_path / "good"
    make_peft_adapter(service.base_dir, good)
    dest = tmp_path / "expert.safetensors"

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PlanError, match="pickle"):
        import_peft_expert(service.cfg, storage, local, "headlines", pickled, dest)
    other = tmp_path / "other"
    other.mkdir()
    conf = json.loads((good / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(
        {**conf, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    (other / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(PlanError, match="another name, pass --any-base"):
        import_peft_expert(service.cfg, storage, local, "headlines", other, dest)
    # the same files accepted by name with --any-base; a wider base is refused by shape
    import_peft_expert(service.cfg, storage, local, "headlines", other, dest, any_base=True)
    assert dest.is_file()
    dest.unlink()
    from serving_fixtures import make_base_model

    wide_dir = tmp_path / "wide"
    make_base_model(wide_dir, hidden_size=96, intermediate_size=160)
    wide = tmp_path / "wide-adapter"
    make_peft_adapter(wide_dir, wide)
    with pytest.raises(PlanError, match="the layer is"):
        import_peft_expert(service.cfg, storage, local, "headlines", wide, dest, any_base=True)
    res_cfg = service.cfg.model_copy(update={"modula": service.cfg.modula.model_copy(
        update={"variant": "res"})})
    with pytest.raises(PlanError, match="LeakyReLU"):
        import_peft_expert(res_cfg, storage, local, "headlines", good, dest)
    assert not dest.exists()


def test_add_domain_from_peft_then_served(service, tmp_path):
    """An adapter made with peft becomes the domain ``headlines`` (only the routing trains:
    the per-token routers and the request classifier, which gains the class);
    the replica picks up the new version and ``modula:headlines`` gives the log probabilities
    of the PEFT model itself."""
    from modula.infra.registry import Registry
    from modula.trainers.runner import add_domain

    adapter = tmp_path / "adapter"
    pm = make_peft_adapter(service.base_dir, adapter, seed=3)
    reg = Registry.from_config(service.cfg)
    before = reg.show("modula")
    version, costs = add_domain(service.cfg, "headlines", from_peft=adapter, show_progress=False)
    assert version.version == before.version + 1
    assert [c.trains for c in costs] == [["routers", "classifier"]]
    assert version.metadata["imported"]["headlines"]["r"] == 4
    for n in ("universal", *DOMAINS):
        assert version.experts[n].sha256 == before.experts[n].sha256  # untouched
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        models = httpx.get(f"{service.url}/v1/models", headers=AUTH, timeout=30).json()
        if "modula:headlines" in [m["id"] for m in models["data"]]:
            break
        time.sleep(0.5)
    ids = ids_of(service, "Shares of ACME rose sharply today")
    r = post(service, "/v1/completions", {"model": "modula:headlines", "prompt": ids,
                                          "max_tokens": 1, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["modula"]["version"] == version.version
    with torch.inference_mode():
        ref = torch.log_softmax(pm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert_prompt_logprobs(r.json()["choices"][0]["logprobs"], ids, ref)
    routed = post(service, "/v1/completions", {**GOOD, "modula": {"weights": {"headlines": 1}}})
    assert routed.status_code == 200 and routed.json()["modula"]["gates"]["headlines"] == \
        pytest.approx(1.0)
