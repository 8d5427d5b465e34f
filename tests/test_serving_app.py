"""The serving graph on real Ray Serve, over real HTTP on loopback: the official ``openai``
client, every bad input, API keys, metrics, a concurrent load, a new domain published under
load, a replica killed under load.

One application for the module: a tiny random Llama base model with MoDULA-Res experts
published to a local registry, two expert replicas, an API key.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from serving_fixtures import (
    DOMAINS,
    deploy_published,
    kill_replica,
    publish_model,
    release_serve,
    run_load,
    running_replicas,
    serve_replicas,
    serving_config,
    shared_base_dir,
)

pytestmark = pytest.mark.integration

APP = "svc-main"
KEY = "sk-modula-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Service:
    url: str
    cfg: Any
    model: Any
    version: int


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    base = shared_base_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("serving-root")
    cfg = serving_config(root, base, app_name=APP, route_prefix=f"/{APP}", api_keys=[KEY],
                         autoscaling={"min_replicas": 2, "max_replicas": 2})
    url, version, model = deploy_published(cfg, APP, AUTH, seed=0)
    yield Service(url=url, cfg=cfg, model=model, version=version)
    release_serve(APP)


@pytest.fixture(scope="module")
def client(service):
    import openai

    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(service: Service, path: str, body: Any, headers: dict[str, str] | None = AUTH,
         raw: bool = False) -> httpx.Response:
    data = body if raw else json.dumps(body)
    h = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{service.url}{path}", content=data, headers=h, timeout=60)


# ------------------------------------------------------------------------------ openai client


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["modula", *(f"modula:{d}" for d in DOMAINS)]
    assert client.models.retrieve("modula:math").id == "modula:math"


def test_completion_with_the_openai_client(client, service):
    r = client.completions.create(model="modula", prompt="The quick brown fox", max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == "modula"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    ext = r.model_extra["modula"]
    assert ext["domain"] is None and ext["version"] == service.version
    assert set(ext["gates"]) == set(DOMAINS)
    assert sum(ext["gates"].values()) == pytest.approx(1.0, abs=1e-3)
    again = client.completions.create(model="modula", prompt="The quick brown fox", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_pinned_domain_and_gates(client):
    r = client.completions.create(model="modula:math", prompt="Add 2 and 3", max_tokens=6,
                                  temperature=0.7, seed=11)
    assert r.model_extra["modula"]["domain"] == "math"
    assert r.model_extra["modula"]["gates"]["math"] == pytest.approx(1.0)
    same = client.completions.create(model="modula:math", prompt="Add 2 and 3", max_tokens=6,
                                     temperature=0.7, seed=11)
    assert same.choices[0].text == r.choices[0].text  # the seed makes sampling repeatable


def test_chat_with_the_openai_client(client):
    r = client.chat.completions.create(
        model="modula:code",
        messages=[{"role": "system", "content": "You write Python."},
                  {"role": "user", "content": "Write a loop."}],
        max_tokens=10, temperature=0, stop=["\n\n"])
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert "\n\n" not in msg.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_and_completion(client):
    chunks = list(client.chat.completions.create(
        model="modula", messages=[{"role": "user", "content": "Tell me about lists."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["modula"]["gates"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    plain = client.chat.completions.create(
        model="modula", messages=[{"role": "user", "content": "Tell me about lists."}],
        max_tokens=12, temperature=0)
    assert text == plain.choices[0].message.content  # the stream adds up to the same answer

    stream = client.completions.create(model="modula:units", prompt="Convert 3 km", max_tokens=9,
                                       temperature=0, stream=True)
    parts = list(stream)
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    assert parts[-1].model_extra["modula"]["domain"] == "units"
    joined = "".join(p.choices[0].text for p in parts)
    ref = client.completions.create(model="modula:units", prompt="Convert 3 km", max_tokens=9,
                                    temperature=0)
    assert joined == ref.choices[0].text


def test_streaming_sse_wire_format(service):
    body = {"model": "modula", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{service.url}/v1/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        json.loads(e[len("data: "):])


def test_client_disconnect_mid_stream_frees_the_engine(client, service):
    stream = client.completions.create(model="modula", prompt="Once", max_tokens=48,
                                       temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    r = client.completions.create(model="modula", prompt="Once", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


# ------------------------------------------------------------------------------ bad input


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/completions", b'{"model": "modula", "prompt": ', 400, "invalid_json"),
    ("/v1/completions", b"not json at all", 400, "invalid_json"),
    ("/v1/chat/completions", b'["a list"]', 400, "invalid_json"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "max_tokens": "ten"}, 400,
     "invalid_type"),
    ("/v1/completions", {"model": "modula", "prompt": 12}, 400, "invalid_type"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "temperature": "warm"}, 400,
     "invalid_type"),
    ("/v1/chat/completions", {"model": "modula", "messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "modula", "messages": [{"role": "user"}], "stream": 1},
     400, "invalid_type"),
    ("/v1/completions", {"model": "modula", "prompt": "word " * 200}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "modula", "messages": [
        {"role": "user", "content": "word " * 200}]}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "modula", "prompt": [1, 2, 10**9]}, 400, "invalid_value"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "max_tokens": 0}, 400,
     "invalid_value"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "max_tokens": 10**6}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"model": "modula", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -3}, 400, "invalid_value"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "n": 100}, 400, "invalid_value"),
    ("/v1/completions", {"model": "modula", "prompt": "x", "logprobs": 21}, 400,
     "invalid_value"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/completions", {"model": "modula:finance", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "modula:finance", "stream": True,
                              "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found"),
])
def test_bad_input_is_a_4xx_with_an_openai_error(service, path, body, status, code):
    r = post(service, path, body, raw=isinstance(body, bytes))
    assert error_of(r, status)["code"] == code


def test_unknown_model_through_the_openai_client(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="modula:nope",
                                       messages=[{"role": "user", "content": "x"}])
    assert "nope" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="modula", prompt="x", max_tokens=100000)


def test_api_keys(service):
    body = {"model": "modula", "prompt": "x", "max_tokens": 2}
    assert error_of(post(service, "/v1/completions", body, headers=None), 401)["code"] == \
        "invalid_api_key"
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert error_of(post(service, "/v1/completions", body, headers=wrong), 401)["code"] == \
        "invalid_api_key"
    r = httpx.get(f"{service.url}/v1/models", timeout=30)
    assert error_of(r, 401)["type"] == "authentication_error"
    assert post(service, "/v1/completions", body).status_code == 200


def test_unknown_routes_and_methods(service):
    r = httpx.get(f"{service.url}/v1/nothing-here", headers=AUTH, timeout=30)
    assert error_of(r, 404)["code"] == "unknown_url"
    r = httpx.get(f"{service.url}/v1/completions", headers=AUTH, timeout=30)
    assert error_of(r, 405)["code"] == "method_not_allowed"


def test_metrics_endpoint(service, client):
    client.completions.create(model="modula:code", prompt="def f", max_tokens=3)
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    for name in ("modula_requests_total", "modula_request_latency_seconds_bucket",
                 "modula_time_to_first_token_seconds_bucket", "modula_prompt_tokens_total",
                 "modula_completion_tokens_total", "modula_domain_requests_total",
                 "modula_gate_mass_total", "modula_requests_in_flight"):
        assert name in text, name
    assert 'modula_domain_requests_total{domain="code",mode="pinned"}' in text
    assert 'status="400"' in text and 'status="401"' in text and 'status="404"' in text


# ------------------------------------------------------------------------------ load


def bodies(n: int, domains: list[str | None]) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        d = domains[i % len(domains)]
        model = "modula" if d is None else f"modula:{d}"
        if i % 3 == 2:
            out.append({"model": model, "max_tokens": 4 + i % 9, "temperature": 0.8, "seed": i,
                        "messages": [{"role": "user", "content": f"question {i} about lists"}]})
        else:
            out.append({"model": model, "prompt": f"Request {i}: the module", "temperature": 0,
                        "max_tokens": 4 + i % 9})
    return out


def test_concurrent_load_has_no_failures(service):
    t0 = time.monotonic()
    res = run_load(service.url, bodies(64, [None, *DOMAINS]), concurrency=16, headers=AUTH)
    elapsed = time.monotonic() - t0
    assert res.total == 64
    assert res.failed == 0, (res.errors[:3], [b for b in res.bodies if "error" in b][:3])
    assert elapsed < 90
    pinned = [b for b in res.bodies if b["model"] != "modula"]
    assert all(b["modula"]["gates"][b["model"].split(":")[1]] == pytest.approx(1.0)
               for b in pinned)
    # requests of different domains really were batched together
    info = httpx.get(f"{service.url}/v1/models", headers=AUTH, timeout=30).json()
    engine = info["data"][0]["modula"]["deployments"][0]["engine"]
    assert engine["max_batch"] >= 2


def test_hot_add_of_a_domain_under_load(service):
    """Publish a version with a new domain while requests flow: nothing fails, the replicas
    switch without a restart, and the new domain answers afterwards."""
    stop = threading.Event()
    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.update(res=run_load(
        service.url, bodies(40, [None, *DOMAINS]), concurrency=6, headers=AUTH, stop=stop)))
    worker.start()
    try:
        time.sleep(1.5)
        version, _ = publish_model(service.cfg, [*DOMAINS, "headlines"], seed=5,
                                   previous=service.model)
        assert version == service.version + 1
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            r = httpx.get(f"{service.url}/v1/models", headers=AUTH, timeout=30)
            seen = [m["id"] for m in r.json()["data"]]
            if "modula:headlines" in seen:
                break
            time.sleep(0.5)
        assert "modula:headlines" in seen, seen
        time.sleep(1.0)  # keep the load on across the switch of both replicas
    finally:
        stop.set()
        worker.join(timeout=120)
    res = out["res"]
    assert res.total > 10
    assert res.failed == 0, (res.errors[:3], [b for b in res.bodies if "error" in b][:3])
    versions = {b["modula"]["version"] for b in res.bodies}
    assert service.version in versions
    # the new domain answers, on whichever replica a request lands
    for i in range(6):
        r = post(service, "/v1/completions", {"model": "modula:headlines", "max_tokens": 3,
                                              "prompt": f"Shares of ACME rose {i}%"})
        assert r.status_code == 200, r.text
        ext = r.json()["modula"]
        assert ext["version"] == version and ext["gates"]["headlines"] == pytest.approx(1.0)
    routed = post(service, "/v1/completions", {"model": "modula", "prompt": "x", "max_tokens": 2})
    assert set(routed.json()["modula"]["gates"]) == {*DOMAINS, "headlines"}
    service.version = version


def test_replica_killed_during_load(service):
    """One of the two expert replicas dies mid-load: at most 1% of requests fail, Serve
    replaces it, and the service answers normally afterwards."""
    replicas = serve_replicas(APP, "Experts")
    assert len(replicas) == 2
    stop = threading.Event()
    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.update(res=run_load(
        service.url, bodies(48, [None, *DOMAINS]), concurrency=8, headers=AUTH, stop=stop)))
    worker.start()
    try:
        time.sleep(2.0)
        kill_replica(replicas[0])
        time.sleep(4.0)
    finally:
        stop.set()
        worker.join(timeout=120)
    res = out["res"]
    print(f"replica killed under load: {res.failed} of {res.total} requests failed")
    assert res.total >= 20
    assert res.failed <= 0.01 * res.total, (res.failed, res.total, res.errors[:3],
                                            [b for b in res.bodies if "error" in b][:3])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and running_replicas(APP, "Experts") < 2:
        time.sleep(0.5)
    assert running_replicas(APP, "Experts") == 2
    assert replicas[0] not in serve_replicas(APP, "Experts")
    after = run_load(service.url, bodies(8, [None, "math"]), concurrency=4, headers=AUTH)
    assert after.failed == 0
