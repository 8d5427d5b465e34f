"""The rendered Serve config, deployed as ``serve deploy`` would deploy it (the controller
imports ``modula.serving.app:build_app`` with the config as args), with experts sharded over
two deployments: the Router sends pinned requests to the group holding the domain and routed
ones to the group with the most gate mass; API keys come from ``MODULA_API_KEYS``."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import torch
from serving_fixtures import (
    DOMAINS,
    ensure_serve,
    publish_model,
    release_serve,
    serving_config,
    shared_base_dir,
    wait_ready,
)

pytestmark = pytest.mark.integration

APP = "svc-groups"
KEYS = ("sk-group-one", "sk-group-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
GROUPS = [["code", "math"], ["units", "headlines"]]


@pytest.fixture(scope="module")
def grouped(ray_local, tmp_path_factory):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from modula.cluster.render import render_objects

    base = shared_base_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("serving-groups-root")
    cfg = serving_config(root, base, app_name=APP, route_prefix=f"/{APP}",
                         experts_per_deployment=2)
    # the keys reach the cluster through the environment, as a KubeRay Secret would put them
    cfg.cluster.runtime_env = {"env_vars": {"MODULA_API_KEYS": ",".join(KEYS)}}
    version, model = publish_model(cfg, DOMAINS, seed=1)
    port = ensure_serve()
    (doc,) = render_objects(cfg, "serve")
    app = doc["applications"][0]
    assert app["import_path"] == "modula.serving.app:build_app"
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "Router", "Experts0",
                                                       "Experts1"]
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc))
    url = f"http://127.0.0.1:{port}/{APP}"
    wait_ready(url, AUTH, timeout=180)
    yield {"url": url, "cfg": cfg, "model": model, "version": version}
    release_serve(APP)


def complete(url: str, model: str, prompt: str, **kw: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0, **kw}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_every_group(grouped):
    r = httpx.get(f"{grouped['url']}/v1/models", headers=AUTH, timeout=30)
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["modula", *(f"modula:{d}" for d in DOMAINS)]
    deps = {d["deployment"]: d["domains"] for d in data[0]["modula"]["deployments"]}
    assert deps == {"Experts0": ["code", "math"], "Experts1": ["units"]}


def test_keys_from_the_environment(grouped):
    body = {"model": "modula", "prompt": "x", "max_tokens": 2}
    for key in KEYS:
        r = httpx.post(f"{grouped['url']}/v1/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    assert httpx.post(f"{grouped['url']}/v1/completions", json=body, timeout=60).status_code == 401


def test_pinned_requests_go_to_the_group_of_their_domain(grouped):
    for domain, dep in (("code", "Experts0"), ("math", "Experts0"), ("units", "Experts1")):
        ext = complete(grouped["url"], f"modula:{domain}", "Convert 5 miles")["modula"]
        assert ext["deployment"] == dep and ext["gates"][domain] == pytest.approx(1.0)


def test_per_request_weights_go_to_the_group_of_their_experts(grouped):
    """The ``modula`` field's experts decide the group; zero weights need none; experts of two
    groups are a 400, an unknown one a 404."""
    ext = complete(grouped["url"], "modula", "Convert 5 miles",
                   modula={"weights": {"code": 1, "math": 3, "units": 0}})["modula"]
    assert ext["deployment"] == "Experts0"
    assert ext["gates"] == pytest.approx({"code": 0.25, "math": 0.75}, abs=1e-5)
    assert ext["routing"] == {"mode": "weights", "weights": {"code": 0.25, "math": 0.75}}
    ext = complete(grouped["url"], "modula", "Convert 5 miles",
                   modula={"domains": ["units"]})["modula"]
    assert ext["deployment"] == "Experts1" and ext["gates"]["units"] == pytest.approx(1.0)
    for body, status, param in (({"weights": {"code": 1, "units": 1}}, 400, "modula.weights"),
                                ({"domains": ["math", "units"]}, 400, "modula.domains"),
                                ({"domains": ["finance"]}, 404, "modula.domains")):
        r = httpx.post(f"{grouped['url']}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "modula", "prompt": "x", "max_tokens": 2, "modula": body})
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param


def expected_group(model: Any, tokenizer: Any, prompt: str) -> tuple[int, float]:
    """The group with the most mean gate mass over the prompt, and its margin."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode(), model.capture_gates():
        model(input_ids=ids)
        gates = model.mean_gates()[0].tolist()
    by_domain = dict(zip(model.expert_names, gates, strict=True))
    mass = [sum(by_domain.get(d, 0.0) for d in g) for g in GROUPS]
    best = max(range(2), key=lambda i: mass[i])
    return best, abs(mass[0] - mass[1])


def test_routed_requests_go_to_the_group_with_the_most_gate_mass(grouped):
    from modula.serving.modeling import load_tokenizer

    tok = load_tokenizer(grouped["cfg"])
    model = grouped["model"]
    prompts = [f"{w} number {i}" for i, w in enumerate(
        ["def parse", "Add 17 and 25", "Convert 3 km to m", "Stocks fell", "The list sort",
         "How many grams", "import os", "Multiply 6 by 7", "class Node", "A meter is"])]
    checked = seen = 0
    groups_hit, groups_wanted = set(), set()
    for p in prompts:
        want, margin = expected_group(model, tok, p)
        ext = complete(grouped["url"], "modula", p)["modula"]
        groups_hit.add(ext["deployment"])
        seen += 1
        if margin > 0.02:  # near-ties may go either way
            checked += 1
            groups_wanted.add(f"Experts{want}")
            assert ext["deployment"] == f"Experts{want}", (p, margin)
        # the gates are those of the group's own experts, renormalised over that group
        assert set(ext["gates"]) == set(GROUPS[int(ext["deployment"][-1])]) & set(DOMAINS)
        assert sum(ext["gates"].values()) == pytest.approx(1.0, abs=1e-3)
    assert checked >= seen // 2
    assert groups_wanted <= groups_hit


def test_a_new_domain_joins_its_configured_group(grouped):
    version, _ = publish_model(grouped["cfg"], [*DOMAINS, "headlines"], seed=9,
                               previous=grouped["model"])
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(f"{grouped['url']}/v1/completions", headers=AUTH, timeout=60, json={
            "model": "modula:headlines", "prompt": "ACME beats estimates", "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    ext = r.json()["modula"]
    assert ext["deployment"] == "Experts1" and ext["version"] == version
    assert set(ext["gates"]) == {"units", "headlines"}
