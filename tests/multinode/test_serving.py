"""Serving on several nodes: the two expert replicas on two worker nodes (the ingress and the
router on the head), a node lost under a bounded load: at most 1 % of the requests fail, none
hangs past its timeout, Serve brings a replacement replica up on the node left, and every
request after that succeeds."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from multinode_helpers import actor_nodes
from serving_fixtures import (
    DOMAINS,
    free_port,
    make_base_model,
    publish_model,
    run_load,
    running_replicas,
    serving_config,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

APP = "svc-multinode"
TIMEOUT = 30.0  # a request not answered within this counts as failed (hung)


def _bodies() -> list[dict[str, Any]]:
    """Routed and pinned completions, chat, and streamed chat."""
    out: list[dict[str, Any]] = []
    for i in range(24):
        model = "modula" if i % 2 else f"modula:{DOMAINS[i % len(DOMAINS)]}"
        if i % 4 == 3:
            out.append({"model": model, "stream": True, "max_tokens": 6, "temperature": 0,
                        "messages": [{"role": "user", "content": f"stream {i} about lists"}]})
        elif i % 4 == 2:
            out.append({"model": model, "max_tokens": 6, "temperature": 0.7, "seed": i,
                        "messages": [{"role": "user", "content": f"question {i} on tuples"}]})
        else:
            out.append({"model": model, "prompt": f"Request {i}: the module", "max_tokens": 6,
                        "temperature": 0})
    return out


def _expert_nodes() -> list[str]:
    return sorted(actor_nodes(name_prefix=f"SERVE_REPLICA::{APP}#Experts#").values())


def test_expert_replicas_on_two_nodes_survive_losing_one(nodes, s3_server, s3_module,
                                                         tmp_path):
    from ray import serve

    from modula.serving.app import build_graph

    section, st = s3_module(s3_server)
    make_base_model(tmp_path / "base")
    st.upload_dir(tmp_path / "base", "base")  # every replica loads the base from S3
    cfg = serving_config(section["root"], st.uri("base"), storage=section, app_name=APP,
                         route_prefix=f"/{APP}",
                         autoscaling={"min_replicas": 2, "max_replicas": 2},
                         resources={"num_cpus": 0, "custom_resources": {"expert_host": 1}})
    version, _ = publish_model(cfg, DOMAINS, seed=0)
    # room for both replicas on either node: after one is lost, its replacement fits
    s1 = nodes.add("s1", num_cpus=0, resources={"expert_host": 2})
    s2 = nodes.add("s2", num_cpus=0, resources={"expert_host": 2})
    port = free_port()
    # one proxy: every node of this cluster has the same address
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/{APP}"
    try:
        serve.run(build_graph(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
        wait_ready(url, timeout=180)
        assert _expert_nodes() == sorted([s1, s2])
        for front in ("Ingress", "Router"):
            assert set(actor_nodes(name_prefix=f"SERVE_REPLICA::{APP}#{front}#").values()) == {
                nodes.id("head")}

        stop, out = threading.Event(), {}
        load = threading.Thread(target=lambda: out.update(res=run_load(
            url, _bodies(), concurrency=4, stop=stop, timeout=TIMEOUT)))
        load.start()
        recovered = None
        try:
            time.sleep(8.0)
            lost_at = time.monotonic()
            nodes.remove("s2")  # abruptly: the replica on it dies with the node
            deadline = lost_at + 120
            while time.monotonic() < deadline:
                if running_replicas(APP, "Experts") == 2 and _expert_nodes() == [s1, s1]:
                    recovered = time.monotonic()
                    break
                time.sleep(0.5)
            time.sleep(8.0)  # the load goes on against the recovered service
        finally:
            stop.set()
            load.join(timeout=TIMEOUT + 60)
        res = out["res"]
        print(f"node lost under load: {res.failed} of {res.total} requests failed "
              f"({res.failed_between(lost_at)} after the loss); recovered in "
              f"{(recovered or float('nan')) - lost_at:.1f} s; errors {res.errors[:3]}")
        assert recovered is not None, f"no second replica after the loss: {_expert_nodes()}"
        assert res.started_between(0, lost_at) >= 20 and res.started_between(recovered) >= 10
        assert res.failed <= 0.01 * res.total, (res.failed, res.total, res.errors[:5],
                                                [b for b in res.bodies if "error" in b][:3])
        assert not [e for e in res.errors if e.startswith("hung")]
        assert max(t1 - t0 for t0, t1, _ in res.records) < TIMEOUT
        assert res.failed_between(recovered) == 0
        served = {b["modula"]["version"] for b in res.bodies if "modula" in b}
        assert served == {version}
    finally:
        serve.delete(APP)
        serve.shutdown()
