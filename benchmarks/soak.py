"""Soak test of the serving graph (``make soak``; not part of ``make test``).

Ten minutes (``--minutes``) of bounded mixed traffic over real HTTP on loopback against one
MoDULA service: completions and chat, plain and streamed, routed by the gates (``modula``) and
pinned to a domain (``modula:<domain>``), and clients that hang up in the middle of a stream.
Halfway through, ``add-domain headlines`` runs for real (Ray Train: the new expert, then the
routers; published on top of the served version), and the replica picks the new version up
without a restart; from then on requests for ``modula:headlines`` join the traffic.

Reported: every request's outcome (target: no failure; a client's own hang-up is not a
failure), latencies, the versions served, the add-domain's duration, the expert replica's
resident memory (RSS) sampled from start to end (target: end within 10 % of start) and what
the engine still holds at the end (target: nothing in flight). A table (80 columns) on the
terminal and a JSON file under ``runs/soak/``.

The service is the serving tests' (tests/serving_fixtures.py): a tiny random Llama base with a
byte-level BPE tokenizer, random MoDULA-Res experts for code, math and units, one expert
replica, a local registry under ``runs/soak/<stamp>/``.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--concurrency 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

APP = "soak"
NEW_DOMAIN = "headlines"
TIMEOUT = 60.0  # a request unanswered for this long counts as failed (hung)


def bodies(domains: list[str], seed: int) -> list[dict[str, Any]]:
    """A cycle of requests: every kind (completion / chat, plain / streamed / hung up on)
    routed and pinned to each domain, with varied lengths and sampling."""
    out: list[dict[str, Any]] = []
    models = ["modula", *(f"modula:{d}" for d in domains)]
    kinds = ["completion", "chat", "stream-completion", "stream-chat", "disconnect"]
    i = seed
    for model in models:
        for kind in kinds:
            i += 1
            n = 4 + i % 13
            sampling = {"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i}
            if kind in ("completion", "stream-completion"):
                body = {"model": model, "prompt": f"Request {i}: the module", "max_tokens": n}
            else:
                body = {"model": model, "max_tokens": n,
                        "messages": [{"role": "user", "content": f"question {i} on lists"}]}
            if kind.startswith("stream") or kind == "disconnect":
                body["stream"] = True
                body["max_tokens"] = 24
            if kind == "disconnect":
                body["_disconnect_after"] = 2  # the client goes away after two events
            out.append({**body, **sampling})
    return out


def replica_pid(app: str) -> int:
    import ray._private.state

    for a in ray._private.state.actors().values():
        if a.get("State") == "ALIVE" and str(a.get("Name", "")).startswith(
                f"SERVE_REPLICA::{app}#Experts#"):
            return int(a["Pid"])
    raise RuntimeError("no live expert replica")


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--add-domain-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve
    from rich.console import Console
    from rich.table import Table
    from serving_fixtures import (
        DOMAINS,
        free_port,
        make_base_model,
        publish_model,
        run_load,
        serving_config,
        wait_ready,
    )

    from modula.config import config_from_dict
    from modula.serving.app import build_graph
    from modula.trainers.runner import add_domain

    console = Console(width=80)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = REPO / "runs" / "soak" / stamp
    work.mkdir(parents=True, exist_ok=True)
    out_path = args.out or REPO / "runs" / "soak" / f"soak-{stamp}.json"

    t_setup = time.monotonic()
    make_base_model(work / "base")
    cfg = serving_config(work / "store", work / "base", app_name=APP, route_prefix=f"/{APP}",
                         autoscaling={"min_replicas": 1, "max_replicas": 1})
    small = {"steps": args.add_domain_steps, "batch_size": 8, "warmup_steps": 2,
             "checkpoint_every": args.add_domain_steps,
             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    cfg = config_from_dict({**cfg.to_data(secrets="reveal"),
                            "stages": {"domain": small, "router": small}})
    v1, _ = publish_model(cfg, DOMAINS, seed=0)
    ray.init(num_cpus=4, include_dashboard=False, namespace="modula-soak", log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/{APP}"
    serve.run(build_graph(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    wait_ready(url, timeout=300)
    setup_s = time.monotonic() - t_setup
    console.print(f"service up in {setup_s:.0f} s: {url} (version {v1}); "
                  f"{args.minutes:g} min of traffic, {args.concurrency} clients")

    pid = replica_pid(APP)
    stop, stop_new = threading.Event(), threading.Event()
    results: dict[str, Any] = {}
    main_load = threading.Thread(target=lambda: results.update(main=run_load(
        url, bodies(DOMAINS, 0), args.concurrency, stop=stop, timeout=TIMEOUT)))
    t0 = time.monotonic()
    main_load.start()
    samples: list[tuple[float, float]] = []
    duration = args.minutes * 60
    add_info: dict[str, Any] = {}
    adder: threading.Thread | None = None
    new_load: threading.Thread | None = None
    rss_start, replaced = None, False

    def add() -> None:
        a0 = time.monotonic()
        version, costs = add_domain(cfg, NEW_DOMAIN, show_progress=False)
        add_info.update(version=version.version, seconds=round(time.monotonic() - a0, 1),
                        runs=[c.run for c in costs])
        while time.monotonic() - a0 < 600:  # until the service lists the new domain
            models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
            if f"modula:{NEW_DOMAIN}" in [m["id"] for m in models]:
                break
            time.sleep(0.5)
        add_info["served_after_s"] = round(time.monotonic() - a0, 1)

    try:
        while (now := time.monotonic() - t0) < duration:
            try:
                samples.append((round(now, 1), round(rss_mb(pid), 1)))
            except FileNotFoundError:  # the replica process is gone: Serve replaced it
                replaced, pid = True, replica_pid(APP)
            if rss_start is None and samples and now >= min(30.0, duration / 10):
                rss_start = samples[-1][1]  # after warm-up: buffers and caches allocated
            if adder is None and now >= duration / 2:
                console.print(f"[{now:.0f} s] add-domain {NEW_DOMAIN} ...")
                add_info["started_at_s"] = round(now, 1)
                adder = threading.Thread(target=add)
                adder.start()
            if adder is not None and new_load is None and "served_after_s" in add_info:
                console.print(f"[{now:.0f} s] v{add_info['version']} published in "
                              f"{add_info['seconds']:.0f} s, served after "
                              f"{add_info['served_after_s']:.0f} s")
                new_load = threading.Thread(target=lambda: results.update(new=run_load(
                    url, bodies([NEW_DOMAIN], 1000), 1, stop=stop_new, timeout=TIMEOUT)))
                new_load.start()
            time.sleep(5.0)
    finally:
        stop.set()
        stop_new.set()
        main_load.join(timeout=TIMEOUT + 60)
        if adder is not None:
            adder.join()
        if new_load is not None:
            new_load.join(timeout=TIMEOUT + 60)
    time.sleep(2.0)  # let hung-up streams be noticed and cancelled
    try:
        rss_end = rss_mb(pid)
    except FileNotFoundError:
        replaced, pid = True, replica_pid(APP)
        rss_end = rss_mb(pid)
    samples.append((round(time.monotonic() - t0, 1), round(rss_end, 1)))
    info = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["modula"]
    engine = info["deployments"][0]
    same_replica = not replaced and replica_pid(APP) == pid

    loads = [results["main"], *([results["new"]] if "new" in results else [])]
    total = sum(r.total for r in loads)
    failed = sum(r.failed for r in loads)
    errors = [e for r in loads for e in r.errors][:10]
    bad = [b for r in loads for b in r.bodies if "error" in b][:5]
    lat = [x for r in loads for x in r.latencies]
    versions: dict[str, int] = {}
    for r in loads:
        for b in r.bodies:
            v = (b.get("modula") or {}).get("version")
            if v is not None:
                versions[str(v)] = versions.get(str(v), 0) + 1
    rss_start = rss_start if rss_start is not None else samples[0][1]
    growth = (rss_end - rss_start) / rss_start
    report = {
        "minutes": args.minutes, "concurrency": args.concurrency, "setup_s": round(setup_s, 1),
        "requests": total, "failed": failed, "disconnected": sum(r.disconnected for r in loads),
        "new_domain_requests": results["new"].total if "new" in results else 0,
        "latency_p50_s": round(percentile(lat, 0.5), 3),
        "latency_p99_s": round(percentile(lat, 0.99), 3),
        "latency_max_s": round(max(lat), 3) if lat else None,
        "versions_served": versions, "add_domain": add_info,
        "rss_mb": {"start": rss_start, "end": round(rss_end, 1),
                   "peak": max(s[1] for s in samples), "growth": round(growth, 4),
                   "samples": samples},
        "same_replica": same_replica,
        "engine_at_end": {"in_flight": engine.get("in_flight"),
                          "draining": engine.get("draining"), "reloads": engine.get("reloads")},
        "errors": errors, "error_bodies": bad,
        "targets": {"failed": 0, "rss_growth_max": 0.10},
        "passed": (failed == 0 and abs(growth) <= 0.10 and engine.get("in_flight") == 0
                   and "served_after_s" in add_info),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))

    t = Table(title=f"soak: {args.minutes:g} min, {args.concurrency} clients, "
                    f"add-domain at {add_info.get('started_at_s', '-')} s", width=80)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_row("requests", f"{total:,}", "")
    t.add_row("failed", f"{failed}", "0")
    t.add_row("hung up by the client", f"{report['disconnected']:,}", "")
    t.add_row(f"requests for {NEW_DOMAIN} (after add)", f"{report['new_domain_requests']:,}", "")
    t.add_row("latency p50 / p99 / max (s)",
              f"{report['latency_p50_s']:.2f} / {report['latency_p99_s']:.2f} / "
              f"{report['latency_max_s'] or 0:.2f}", f"< {TIMEOUT:.0f}")
    t.add_row("versions served (requests)",
              ", ".join(f"v{k}: {n:,}" for k, n in sorted(versions.items())), "")
    t.add_row("add-domain: published / served (s)",
              f"{add_info.get('seconds', '-')} / {add_info.get('served_after_s', '-')}", "")
    t.add_row("replica RSS start / end (MB)", f"{rss_start:.0f} / {rss_end:.0f}", "")
    t.add_row("replica RSS growth", f"{growth:+.1%}", "within 10 %")
    t.add_row("same replica process throughout", "yes" if same_replica else "no", "yes")
    t.add_row("in flight at the end", f"{engine.get('in_flight')}", "0")
    console.print(t)
    console.print(f"{'PASSED' if report['passed'] else 'FAILED'}: written {out_path}")
    serve.delete(APP)
    serve.shutdown()
    ray.shutdown()
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
