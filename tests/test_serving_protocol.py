"""The OpenAI wire format, Ray-free: parsing, every refusal as a 4xx with an OpenAI error body,
API keys, response and chunk shapes, the metrics registry."""

from __future__ import annotations

import json
import pickle

import pytest

from modula.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationResult,
    Limits,
    SamplingParams,
    chat_chunk,
    chat_response,
    check_api_key,
    check_limits,
    check_prompt_length,
    completion_chunk,
    completion_prompt,
    completion_prompts,
    completion_response,
    hash_api_key,
    model_list,
    parse_json_body,
    parse_model_name,
    parse_request,
    resolve_max_tokens,
    routing_extension,
    sse,
)

LIMITS = Limits(max_prompt_tokens=32, max_tokens_limit=20)


def refused(fn, *args, status: int = 400, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == status, err
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["message"]
    return err


def test_json_body_errors():
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    assert refused(parse_json_body, b'{"model": ').code == "invalid_json"
    assert refused(parse_json_body, b"").code == "invalid_json"
    assert refused(parse_json_body, b"[1, 2]").code == "invalid_json"
    assert refused(parse_json_body, b"\xff\xfe").code == "invalid_json"
    assert refused(parse_json_body, b"x" * 2000, max_bytes=1024, status=413).code == \
        "request_too_large"


@pytest.mark.parametrize("field,value,code", [
    ("max_tokens", "10", "invalid_type"),
    ("max_tokens", 1.5, "invalid_type"),
    ("max_tokens", True, "invalid_type"),
    ("temperature", "hot", "invalid_type"),
    ("temperature", 3.0, "invalid_value"),
    ("top_p", 0, "invalid_value"),
    ("stream", "yes", "invalid_type"),
    ("prompt", 7, "invalid_type"),
    ("prompt", [1, "a"], "invalid_type"),
    ("stop", [""], "invalid_value"),
    ("seed", 2**70, "invalid_value"),
    ("frequency_penalty", 5, "invalid_value"),
    ("model", 3, "invalid_type"),
    ("bogus", 1, "unknown_parameter"),
])
def test_completion_wrong_types_and_values(field, value, code):
    body = {"model": "m", "prompt": "hi", field: value}
    err = refused(parse_request, "completion", body)
    assert err.code == code
    assert err.param == field or (err.param or "").startswith(field)


def test_missing_fields():
    assert refused(parse_request, "completion", {"model": "m"}).code == "missing_required_parameter"
    assert refused(parse_request, "completion", {"prompt": "x"}).param == "model"
    assert refused(parse_request, "chat", {"model": "m", "messages": []}).param == "messages"
    err = refused(parse_request, "chat", {"model": "m", "messages": [{"role": "robot",
                                                                      "content": "x"}]})
    assert err.param.startswith("messages.0.role")


def test_unsupported_options_are_refused():
    for extra in ({"best_of": 2}, {"suffix": "x"}, {"stop_token_ids": [-1]},
                  {"logit_bias": {"x": 5}}, {"n": 0}, {"logprobs": -1}, {"top_k": -2},
                  {"min_p": 1.5}, {"repetition_penalty": 0}):
        err = refused(parse_request, "completion", {"model": "m", "prompt": "x", **extra})
        assert err.param.startswith(next(iter(extra)))
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    refused(parse_request, "chat", {**chat, "tools": [{"type": "function"}]})
    refused(parse_request, "chat", {**chat, "response_format": {"type": "json_object"}})
    refused(parse_request, "chat", {**chat, "max_tokens": 3, "max_completion_tokens": 4})
    assert refused(parse_request, "chat", {**chat, "top_logprobs": 2}).param == "top_logprobs"
    # the defaults the official client may send are accepted
    parse_request("chat", {**chat, "n": 1, "logprobs": False, "response_format": {"type": "text"},
                           "stream_options": {"include_usage": True}, "user": "u"})


def test_what_evaluation_tools_send_is_accepted():
    """lm-evaluation-harness's loglikelihood and generate_until bodies, vLLM's extensions,
    n, logprobs, long stop lists, logit bias."""
    ll = parse_request("completion", {"model": "m", "prompt": [[1, 2, 3], [4, 5]],
                                      "temperature": 0, "max_tokens": 1, "logprobs": 1,
                                      "seed": 1234, "echo": True})
    assert completion_prompts(ll) == [[1, 2, 3], [4, 5]]
    p = SamplingParams.from_request(ll, 1)
    assert (p.logprobs, p.prompt_logprobs) == (1, 1)
    gen = parse_request("completion", {
        "model": "m", "prompt": ["a", "b"], "max_tokens": 8, "temperature": 0,
        "stop": [f"s{i}" for i in range(10)], "seed": 3, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.2, "min_tokens": 2, "stop_token_ids": [7], "ignore_eos": True,
        "n": 2, "logit_bias": {"5": -100}})
    check_limits(gen, LIMITS)
    p = SamplingParams.from_request(gen, 8, seed_offset=1)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids,
            p.ignore_eos, p.seed, p.logit_bias, p.logprobs) == (
        5, 0.1, 1.2, 2, (7,), True, 4, ((5, -100.0),), None)
    chat = parse_request("chat", {"model": "m", "logprobs": True, "top_logprobs": 3,
                                  "messages": [{"role": "user", "type": "text", "content": "x"}]})
    assert SamplingParams.from_request(chat, 4).logprobs == 3
    assert SamplingParams.from_request(chat, 4).prompt_logprobs is None


def test_limits_from_the_config():
    limits = Limits(max_prompt_tokens=32, max_tokens_limit=20, max_logprobs=5, max_n=2,
                    max_batch_prompts=3, max_stop_sequences=4)
    base = {"model": "m", "prompt": "x"}
    for extra, param in (({"logprobs": 6}, "logprobs"), ({"n": 3}, "n"),
                         ({"stop": list("abcde")}, "stop"),
                         ({"stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids")):
        assert refused(check_limits, parse_request("completion", {**base, **extra}),
                       limits).param == param
    chat = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                  "logprobs": True, "top_logprobs": 6})
    assert refused(check_limits, chat, limits).param == "top_logprobs"
    many = parse_request("completion", {**base, "prompt": ["a"] * 4})
    assert refused(completion_prompts, many, limits).param == "prompt"
    assert refused(completion_prompts, parse_request("completion", {**base, "prompt": [[1], []]}),
                   limits).param == "prompt.1"
    from modula.config import config_from_dict

    serve = config_from_dict({"serve": {"max_n": 3, "max_logprobs": 7}}).serve
    assert Limits.from_config(serve).max_n == 3 and Limits.from_config(serve).max_logprobs == 7


def test_unknown_fields_policy():
    body = {"model": "m", "prompt": "x", "do_sample": True, "until": ["a"]}
    err = refused(parse_request, "completion", body)
    assert err.code == "unknown_parameter" and err.param == "do_sample"
    req = parse_request("completion", body, "ignore")
    assert req.ignored_fields == ["do_sample", "until"]
    # nested objects stay strict: a typo inside the routing field is refused either way
    bad = {"model": "m", "prompt": "x", "modula": {"weight": {"math": 1}}}
    assert refused(parse_request, "completion", bad, "ignore").param == "modula.weight"


def test_routing_extension():
    def routing(ext, model="m"):
        req = parse_request("completion", {"model": model, "prompt": "x", "modula": ext})
        return routing_extension(req, parse_model_name(model, "m"))

    r = routing({"weights": {"math": 3, "units": 1.0}})
    assert r.mode == "weights" and dict(r.weights) == {"math": 0.75, "units": 0.25}
    assert r.report() == {"mode": "weights", "weights": {"math": 0.75, "units": 0.25}}
    r = routing({"domains": ["math", "code"]})
    assert r.mode == "domains" and r.allowed == ("math", "code")
    assert routing_extension(parse_request("completion", {"model": "m", "prompt": "x"}),
                             "math").mode == "pinned"
    for ext, param in (({"weights": {"math": -1}}, "modula.weights.math"),
                       ({"weights": {"math": float("inf")}}, "modula.weights.math"),
                       ({"weights": {"math": float("nan")}}, "modula.weights.math"),
                       ({"weights": {"math": 0, "units": 0}}, "modula.weights"),
                       ({"weights": {}}, "modula.weights"),
                       ({"domains": []}, "modula.domains"),
                       ({"domains": ["math", "math"]}, "modula.domains")):
        assert refused(routing, ext).param == param, ext
    assert refused(routing, {"domains": ["math"]}, "m:code").param == "modula"
    for ext in ({}, {"domains": ["a"], "weights": {"a": 1}}, {"weights": {"a": "x"}}):
        assert refused(parse_request, "completion", {"model": "m", "prompt": "x",
                                                     "modula": ext}).param.startswith("modula")


def test_tokenizer_route_requests():
    assert parse_request("tokenize", {"prompt": "hi", "add_special_tokens": False}).prompt == "hi"
    refused(parse_request, "tokenize", {"model": "m"})
    refused(parse_request, "tokenize", {"prompt": "a", "messages": []})
    assert parse_request("detokenize", {"tokens": [1, 2]}).tokens == [1, 2]
    refused(parse_request, "detokenize", {"tokens": ["a"]})


def test_chat_content_parts_and_roles():
    req = parse_request("chat", {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b",
                                                                     "cache_control": {}}],
         "type": "text", "extra": 1},
    ]})
    assert isinstance(req, ChatCompletionRequest)
    assert [m.text() for m in req.messages] == ["be brief", "ab"]
    err = refused(parse_request, "chat", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert "only text" in err.message and err.param == "messages.0.content"


def test_model_names():
    assert parse_model_name("modula", "modula") is None
    assert parse_model_name("modula:math", "modula") == "math"
    assert refused(parse_model_name, "gpt-4", "modula", status=404).code == "model_not_found"
    assert refused(parse_model_name, "modula:", "modula", status=404).param == "model"


def test_max_tokens_range_and_defaults():
    c = parse_request("completion", {"model": "m", "prompt": "x"})
    assert resolve_max_tokens(c, LIMITS) == 16  # OpenAI's completions default
    chat = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert resolve_max_tokens(chat, LIMITS) == LIMITS.max_tokens_limit
    for bad in (0, -1, 21):
        req = parse_request("completion", {"model": "m", "prompt": "x", "max_tokens": bad})
        assert refused(resolve_max_tokens, req, LIMITS).param == "max_tokens"
    echo = parse_request("completion", {"model": "m", "prompt": "x", "max_tokens": 0,
                                        "echo": True})
    assert resolve_max_tokens(echo, LIMITS) == 0  # score the prompt alone
    req = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                 "max_completion_tokens": 50})
    assert refused(resolve_max_tokens, req, LIMITS).param == "max_completion_tokens"


def test_prompt_forms_and_length():
    def prompt(p):
        return completion_prompt(CompletionRequest.model_validate({"model": "m", "prompt": p}))

    assert prompt("abc") == "abc"
    assert prompt(["abc"]) == "abc"
    assert prompt([5, 6, 7]) == [5, 6, 7]
    assert prompt([[5, 6, 7]]) == [5, 6, 7]
    assert refused(prompt, ["a", "b"]).code == "unsupported_value"
    assert refused(prompt, []).code == "invalid_value"
    check_prompt_length(32, LIMITS, "prompt")
    assert refused(check_prompt_length, 33, LIMITS, "prompt").code == "context_length_exceeded"
    assert refused(check_prompt_length, 0, LIMITS, "prompt").code == "invalid_value"


def test_api_keys():
    hashes = [hash_api_key("sk-one"), hash_api_key("sk-two")]
    check_api_key(None, [])  # no keys configured: open
    check_api_key("Bearer sk-two", hashes)
    check_api_key("bearer   sk-one ", hashes)
    for header in (None, "", "Bearer", "Basic sk-one", "Bearer sk-three", "sk-one"):
        assert refused(check_api_key, header, hashes, status=401).code == "invalid_api_key"


def test_api_error_survives_pickling():
    err = APIError(404, "nope", param="model", code="model_not_found")
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.message, back.param, back.code) == (404, "nope", "model",
                                                                  "model_not_found")
    assert back.body() == err.body()


def test_sampling_params_from_request():
    req = parse_request("completion", {"model": "m", "prompt": "x", "temperature": 0,
                                       "top_p": 0.5, "stop": "END", "seed": 3,
                                       "presence_penalty": 0.5})
    p = SamplingParams.from_request(req, 7)
    assert p == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, stop=("END",), seed=3,
                               presence_penalty=0.5)
    pickle.loads(pickle.dumps(p))


def test_response_shapes_validate_with_the_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    res = GenerationResult(text="hello", finish_reason="stop", prompt_tokens=3,
                           completion_tokens=2, gates={"math": 0.75, "code": 0.25},
                           domain=None, info={"version": 2})
    c = Completion.model_validate(completion_response("cmpl-1", "modula", 1, res))
    assert c.choices[0].text == "hello" and c.usage.total_tokens == 5
    assert c.model_extra["modula"]["gates"] == {"math": 0.75, "code": 0.25}
    chat = ChatCompletion.model_validate(chat_response("chatcmpl-1", "modula:math", 1, res))
    assert chat.choices[0].message.content == "hello"
    assert chat.model_extra["modula"]["version"] == 2
    first = ChatCompletionChunk.model_validate(
        chat_chunk("c", "m", 1, {"role": "assistant", "content": ""}))
    assert first.choices[0].delta.role == "assistant"
    usage = ChatCompletionChunk.model_validate(
        chat_chunk("c", "m", 1, {}, usage=res.usage(), usage_only=True))
    assert usage.choices == [] and usage.usage.completion_tokens == 2
    Completion.model_validate(completion_chunk("c", "m", 1, "he", "length"))
    assert completion_chunk("c", "m", 1, "he")["choices"][0]["finish_reason"] is None
    ev = sse(completion_chunk("c", "m", 1, "x", "length", extension=res.extension()))
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    assert json.loads(ev[6:])["modula"]["gates"]["math"] == 0.75
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_model_list():
    from openai.types import Model

    data = model_list("modula", ["code", "math"], 5)
    assert [m["id"] for m in data["data"]] == ["modula", "modula:code", "modula:math"]
    for m in data["data"]:
        Model.model_validate(m)


def test_metrics_registry():
    from modula.serving.metrics import ServingMetrics

    m = ServingMetrics(mirror_to_ray=False)
    m.request_done("completions", 200, 0.5, False)
    m.request_done("completions", 400, 0.01, False)
    m.generation_done(10, 4, None, {"math": 0.7, "code": 0.3})
    m.generation_done(5, 2, "code", {"math": 0.0, "code": 1.0})
    m.first_token("completions", 0.02)
    assert m.sample("modula_requests_total", {"endpoint": "completions", "status": "400"}) == 1
    assert m.sample("modula_prompt_tokens_total") == 15
    assert m.sample("modula_completion_tokens_total") == 6
    assert m.sample("modula_domain_requests_total", {"domain": "math", "mode": "routed"}) == 1
    assert m.sample("modula_domain_requests_total", {"domain": "code", "mode": "pinned"}) == 1
    assert m.sample("modula_gate_mass_total", {"expert": "code"}) == pytest.approx(1.3)
    assert m.sample("modula_request_latency_seconds_count",
                    {"endpoint": "completions", "stream": "false"}) == 1
    body, ctype = m.render()
    assert b"modula_gate_mass_total" in body and ctype.startswith("text/plain")


def test_logprob_objects_validate_with_the_openai_types(tmp_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    from serving_fixtures import make_tokenizer

    from modula.serving.logprobs import TokenTexts, chat_logprobs, completion_logprobs
    from modula.serving.protocol import chat_choice, completion_choice

    tok = make_tokenizer(tmp_path)
    texts = TokenTexts(tok)
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    entries = [None, *[(t, -0.5 * i, ((t, -0.1), (3, -2.0))) for i, t in enumerate(ids[1:])]]
    lp = completion_logprobs(texts, entries, ids)
    assert "".join(lp["tokens"]) == "The quick brown fox"
    assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:i]) for i in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1][lp["tokens"][1]] == -0.1  # the alternative of the same id
    # the echoed first token has no log probability (null, as OpenAI's and vLLM's); the
    # client reads that, its strict type does not: validate the rest
    lp = completion_logprobs(texts, entries[1:], ids[1:], ids[:1], offset=3)
    assert lp["text_offset"][0] == 3
    res = GenerationResult("x", "length", 4, 1)
    c = Completion.model_validate(completion_response(
        "c", "m", 1, [res, res], choices=[completion_choice(0, "x", "length", lp),
                                          completion_choice(1, "y", "stop", None, {"a": 1})]))
    assert c.choices[0].logprobs.tokens == lp["tokens"] and c.usage.prompt_tokens == 8
    chat = chat_logprobs(texts, entries[1:], ids[:1])
    assert [e["token"] for e in chat["content"]] == lp["tokens"]
    assert chat["content"][0]["bytes"] == list(lp["tokens"][0].encode())
    cc = ChatCompletion.model_validate(chat_response(
        "c", "m", 1, res, choices=[chat_choice(0, "x", "stop", chat)]))
    assert cc.choices[0].logprobs.content[0].top_logprobs[1].logprob == -2.0
