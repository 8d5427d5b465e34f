"""Autoscaling from the config, on real Ray Serve: a sustained load above
``target_ongoing_requests`` brings a second expert replica up, and no request fails meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from serving_fixtures import (
    DOMAINS,
    ensure_serve,
    publish_model,
    release_serve,
    run_load,
    running_replicas,
    serving_config,
    shared_base_dir,
    wait_ready,
)

pytestmark = pytest.mark.integration

APP = "svc-autoscale"


def test_load_scales_the_expert_deployment_up(ray_local, tmp_path_factory):
    from ray import serve

    from modula.serving.app import build_graph

    base = shared_base_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("autoscale-root")
    cfg = serving_config(root, base, app_name=APP, route_prefix=f"/{APP}",
                         max_tokens_limit=64,
                         resources={"num_cpus": 0.5},
                         autoscaling={"min_replicas": 1, "max_replicas": 2,
                                      "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                      "downscale_delay_s": 600, "look_back_period_s": 11})
    publish_model(cfg, DOMAINS, seed=0)
    port = ensure_serve()
    serve.run(build_graph(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    url = f"http://127.0.0.1:{port}/{APP}"
    try:
        wait_ready(url)
        assert running_replicas(APP, "Experts") == 1
        stop = threading.Event()
        out: dict[str, Any] = {}
        bodies = [{"model": m, "prompt": f"Request {i}: the module", "max_tokens": 48,
                   "temperature": 0} for i, m in enumerate(["modula", *(f"modula:{d}"
                                                                       for d in DOMAINS)])]
        worker = threading.Thread(target=lambda: out.update(
            res=run_load(url, bodies, concurrency=8, stop=stop)))
        worker.start()
        scaled_after = None
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 150:
                if running_replicas(APP, "Experts") >= 2:
                    scaled_after = time.monotonic() - t0
                    break
                time.sleep(0.5)
            time.sleep(2.0)  # requests keep flowing while the new replica joins
        finally:
            stop.set()
            worker.join(timeout=120)
        res = out["res"]
        print(f"autoscaling: 2 replicas after {scaled_after}s; "
              f"{res.failed} of {res.total} requests failed")
        assert scaled_after is not None, "the load never brought up a second replica"
        assert res.total > 8
        assert res.failed == 0, (res.errors[:3], [b for b in res.bodies if "error" in b][:3])
        replicas = {b["modula"].get("replica") for b in res.bodies if "modula" in b}
        assert replicas, res.bodies[:2]
    finally:
        release_serve(APP)
