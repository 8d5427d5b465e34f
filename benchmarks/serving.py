"""Serving benchmark (not part of the tests): MoDULA-Res served against the bare base and PEFT.

One run per base size (``--size``: ``tiny``, the built-in model; ``small``, hidden 512;
``medium``, hidden 1024, 8 layers, ~100 M parameters; see ``benchmarks/sizes.py``), random
weights (nothing downloads; throughput does not depend on the values). Every system is deployed
at once on one local Ray Serve and driven over real HTTP on loopback at concurrency 32
(``--concurrency``); the systems take turns, round after round (``--rounds``, the order rotated),
and the median over the rounds is reported:

- ``routed``: the MoDULA-Res graph (Ingress -> Router -> Experts, continuous batching), every
  request routed by the per-token routers (model ``modula``);
- ``pinned``: the same deployment, every request pinned to a domain (``modula:<domain>``):
  one expert per row of the batch;
- ``base``: the same base model with no adapters, served the same way (``serve.base_only``):
  the limit;
- ``peft``: what users would otherwise do: PEFT with one LoRA adapter per domain, requests
  batched by ``@serve.batch`` and generated with HF ``generate(adapter_names=...)`` (PEFT's
  mixed-adapter batch), static batching;
- ``peft-single`` (``--naive``): PEFT's plain API, ``set_adapter`` + ``generate`` one request
  at a time.

Every system gets the same requests in a round: prompts of 20-60 words, ``max_tokens`` 16-64
(varied, as real traffic is), greedy. Reported per system: generated tokens/s, requests/s,
p50 / p99 latency, time to first token (p50 / p99: the engine's ``ttft_s``, from the request's
arrival at the ingress; PEFT answers only when its whole batch is done, so its latency is its
time to first token). Beside the overhead of MoDULA-Res over the base (``base tok/s / MoDULA
tok/s - 1``), the adapter FLOP ratio of the size: what the mixture adds over the base model's
linear layers, with the 4 domains, as the formula is written (``benchmarks/sizes.py``); the
target is overhead <= 1.5x that ratio. The load average at the start and the end is recorded.

    .venv/bin/python benchmarks/serving.py --size medium --out benchmarks/results/serving-medium.json
    .venv/bin/python benchmarks/serving.py --plot benchmarks/results   # serving.png from the JSONs
"""

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOMAINS = ["code", "math", "units", "headlines"]
MODEL = "modula"
UNIVERSAL_RANK, DOMAIN_RANK = 16, 8  # the config's defaults

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sizes import SIZES, flop_ratio, tiny_config  # noqa: E402

# ----------------------------------------------------------------------------------- models


def build_base(path: Path, size: str) -> Any:
    """A tokenizer trained on the interpreter's docs + a random model of the built-in
    architecture (``model.tiny``, or larger), saved as an ordinary HF model directory."""
    import pydoc_data.topics as topics

    from modula.basemodel import build_model
    from modula.data.tokenizer import train_tokenizer

    tiny = tiny_config(size)
    texts = [t for t in topics.topics.values()]
    tok = train_tokenizer(texts, tiny.vocab_size, path)
    model = build_model(tiny, tok)
    model.save_pretrained(str(path))
    return model


def make_config(root: Path, base: Path, port: int, threads: int = 1, **serve: Any) -> Any:
    from modula.config import config_from_dict

    return config_from_dict({
        "storage": {"root": str(root)},
        "model": {"base": str(base)},
        "domains": [{"name": "general", "metric": "perplexity"},
                    {"name": "code", "metric": "perplexity"}, {"name": "math"},
                    {"name": "units"}, {"name": "headlines", "metric": "accuracy"}],
        "serve": {"port": port, "max_prompt_tokens": 128, "max_tokens_limit": 64,
                  "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
                  "resources": {"num_cpus": threads}, "threads": threads,
                  "registry_poll_s": 30, **serve},
    })


def publish(cfg: Any) -> None:
    """MoDULA-Res with random experts for every domain, published to the registry."""
    import torch

    from modula.basemodel import load_base_model
    from modula.infra.registry import Registry
    from modula.model import attach_modula, save_experts

    base, _ = load_base_model(cfg)
    model = attach_modula(base, cfg.modula, DOMAINS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and ("experts" in name or "universal" in name
                                              or "router" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = Path(tempfile.mkdtemp(prefix="bench-experts-"))
    save_experts(model, out, cfg.model.base)
    Registry.from_config(cfg).publish(MODEL, out, metadata={"variant": "res"})


# ----------------------------------------------------------------------------------- PEFT


def peft_app(cfg: Any, naive: bool) -> Any:
    """A Serve deployment answering /v1/completions with PEFT, one adapter per request."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()
    batch = 1 if naive else 32

    threads = max(1, round(cfg.serve.resources.num_cpus))

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": threads})
    @serve.ingress(api)
    class Peft:
        def __init__(self, config: dict[str, Any]):
            import torch
            from peft import LoraConfig, get_peft_model

            from modula.basemodel import load_base_model
            from modula.config import config_from_dict
            from modula.model import default_targets

            torch.set_num_threads(threads)
            c = config_from_dict(config)
            base, self.tok = load_base_model(c)
            self.tok.padding_side = "left"
            targets = default_targets(base)
            lc = LoraConfig(r=c.modula.domain_rank, lora_alpha=2 * c.modula.domain_rank,
                            target_modules=targets, lora_dropout=0.0)
            self.model = get_peft_model(base, lc, adapter_name=DOMAINS[0])
            for d in DOMAINS[1:]:
                self.model.add_adapter(d, lc)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            self.model.eval()

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.005)
        async def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return await asyncio.to_thread(self._generate, items)

        def _generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            import torch

            adapters = [it["model"].split(":", 1)[1] for it in items]
            enc = self.tok([it["prompt"] for it in items], return_tensors="pt", padding=True)
            n = max(it["max_tokens"] for it in items)
            with torch.inference_mode():
                if naive:
                    self.model.set_adapter(adapters[0])
                    out = self.model.generate(**enc, max_new_tokens=n, do_sample=False,
                                              pad_token_id=self.tok.pad_token_id)
                else:
                    out = self.model.generate(**enc, max_new_tokens=n, do_sample=False,
                                              adapter_names=adapters,
                                              pad_token_id=self.tok.pad_token_id)
            res = []
            width = enc["input_ids"].shape[1]
            for i, it in enumerate(items):
                new = out[i, width:width + it["max_tokens"]].tolist()
                eos = self.tok.eos_token_id
                if eos in new:
                    new = new[:new.index(eos)]
                res.append({"text": self.tok.decode(new, skip_special_tokens=True),
                            "usage": {"completion_tokens": len(new)}})
            return res

        @api.post("/v1/completions")
        async def completions(self, request: Request) -> JSONResponse:
            return JSONResponse(await self.run(await request.json()))

    from modula.serving.app import replica_config

    return Peft.bind(replica_config(cfg))


# ----------------------------------------------------------------------------------- load


def workload(n: int, seed: int, system: str) -> list[dict[str, Any]]:
    """The requests of one round: the same prompts and lengths for every system (``seed``),
    routed (``routed``, ``base``) or pinned to a domain (``pinned``, PEFT's adapters)."""
    rng = random.Random(seed)
    words = ("the list of values sort key function module import class return number add "
             "convert meter gram stock rose fell price").split()
    pinned = system in ("pinned", "peft", "peft-single")
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        model = f"{MODEL}:{DOMAINS[i % len(DOMAINS)]}" if pinned else MODEL
        out.append({"model": model, "prompt": prompt, "max_tokens": rng.randint(16, 64),
                    "temperature": 0})
    return out


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


async def drive(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send ``bodies`` with ``concurrency`` clients; throughput, latency and first-token time."""
    import httpx

    lat: list[float] = []
    ttft: list[float] = []
    tokens = 0
    failures = 0
    first_error: list[str] = []
    queue = list(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens, failures
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/completions", json=body)
                if r.status_code != 200:
                    failures += 1
                    if not first_error:
                        first_error.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                elapsed = time.perf_counter() - t0
                lat.append(elapsed)
                data = r.json()
                tokens += data["usage"]["completion_tokens"]
                # the engine's time to first token (from the arrival at the ingress); PEFT
                # answers when its batch is done: its first token comes with the answer
                ttft.append(float((data.get("modula") or {}).get("ttft_s", elapsed)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(bodies), "failures": failures,
            "wall_s": round(wall, 3), "req_per_s": round(len(lat) / wall, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(_pct(lat, 0.50), 3), "p99_s": round(_pct(lat, 0.99), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else float("nan"),
            "ttft_p50_s": round(_pct(ttft, 0.50), 3), "ttft_p99_s": round(_pct(ttft, 0.99), 3),
            "first_error": first_error[0] if first_error else None}


METRICS = ("tokens_per_s", "req_per_s", "p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s", "wall_s")


def median_rows(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over the rounds of one system and concurrency."""
    out = {k: round(statistics.median(r[k] for r in rounds), 3) for k in METRICS}
    out["failures"] = sum(r["failures"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def summarise(by: dict[tuple[str, int], dict[str, Any]], ratio: float) -> dict[str, Any]:
    """The issue's figures at each concurrency: overhead against the FLOP ratio, share of the
    base's tokens/s, p99 against the base's, and MoDULA against PEFT."""
    out: dict[str, Any] = {"flop_ratio": round(ratio, 4), "limit": round(1.5 * ratio, 4)}
    for (system, conc), row in by.items():
        if system not in ("routed", "pinned") or ("base", conc) not in by:
            continue
        base = by["base", conc]
        key = f"{system}@{conc}"
        entry = {"share_of_base": row["tokens_per_s"] / base["tokens_per_s"],
                 "overhead": base["tokens_per_s"] / row["tokens_per_s"] - 1,
                 "p99_vs_base": row["p99_s"] / base["p99_s"]}
        entry["overhead_ok"] = entry["overhead"] <= 1.5 * ratio
        for other in ("peft", "peft-single"):
            if (other, conc) in by and by[other, conc]["tokens_per_s"]:
                entry[f"vs_{other}"] = row["tokens_per_s"] / by[other, conc]["tokens_per_s"]
        out[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
    return out


def print_results(size: str, by: dict[tuple[str, int], dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    print(f"\n{size}: medians over the rounds")
    print("system       conc  tok/s  req/s  p50 s  p99 s  ttft50  ttft99")
    for (system, conc), r in by.items():
        print(f"{system:12s} {conc:4d} {r['tokens_per_s']:6.1f} {r['req_per_s']:6.2f} "
              f"{r['p50_s']:6.2f} {r['p99_s']:6.2f} {r['ttft_p50_s']:7.2f} {r['ttft_p99_s']:7.2f}")
    print(f"adapter FLOP ratio {summary['flop_ratio']:.3f}, limit {summary['limit']:.3f}")
    for key, e in summary.items():
        if isinstance(e, dict):
            peft = f", {e['vs_peft']:.2f}x PEFT" if "vs_peft" in e else ""
            print(f"  {key}: {100 * e['share_of_base']:.1f} % of base, overhead "
                  f"{e['overhead']:+.3f} ({'ok' if e['overhead_ok'] else 'over'}), p99 "
                  f"{e['p99_vs_base']:.2f}x base{peft}")


def plot(directory: Path) -> Path | None:
    """``serving.png`` from every ``serving-<size>.json`` in ``directory``: tokens/s per system
    and size, and the measured overhead against 1.5x the FLOP ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for size in SIZES:
        path = directory / f"serving-{size}.json"
        if path.is_file():
            runs.append((size, json.loads(path.read_text())))
    if not runs:
        return None
    systems = ["base", "routed", "pinned", "peft"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        vals = []
        for _, data in runs:
            rows = [r for r in data["results"] if r["system"] == system]
            vals.append(max((r["tokens_per_s"] for r in rows), default=0))
        ax.bar([i + k * width for i in range(len(runs))], vals, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], [s for s, _ in runs])
    ax.set_ylabel("generated tokens/s (median)")
    ax.set_title("concurrency 32")
    ax.legend(fontsize=8)
    for k, system in enumerate(("routed", "pinned")):
        vals = []
        for _, data in runs:
            e = [v for key, v in data["summary"].items() if key.startswith(f"{system}@")]
            vals.append(e[0]["overhead"] if e else 0)
        bx.bar([i + k * 0.3 for i in range(len(runs))], vals, 0.3, label=f"{system} overhead")
    limits = [data["summary"]["limit"] for _, data in runs]
    bx.plot([i + 0.15 for i in range(len(runs))], limits, "k_", markersize=30,
            label="1.5 x FLOP ratio")
    bx.set_xticks([i + 0.15 for i in range(len(runs))], [s for s, _ in runs])
    bx.set_ylabel("base tok/s / MoDULA tok/s - 1")
    bx.legend(fontsize=8)
    fig.tight_layout()
    out = directory / "serving.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny",
                    help="base model size (default: the built-in tiny model's)")
    ap.add_argument("--concurrency", default="32", help="comma list (default %(default)s)")
    ap.add_argument("--requests", type=int, default=96, help="requests per round and system")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default %(default)s)")
    ap.add_argument("--systems", default="routed,pinned,base,peft",
                    help="comma list of routed, pinned, base, peft, peft-single")
    ap.add_argument("--naive", action="store_true", help="also run peft-single")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPUs (torch threads) per model replica (default 1: on a shared "
                         "2-core machine two OpenMP threads per replica mostly wait)")
    ap.add_argument("--gate-report", choices=["prompt", "all", "off"], default="prompt",
                    help="serve.gate_report of the MoDULA graph (default %(default)s)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--plot", type=Path, metavar="DIR",
                    help="only draw DIR/serving.png from DIR/serving-<size>.json")
    args = ap.parse_args(argv)
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    systems = args.systems.split(",") + (["peft-single"] if args.naive else [])
    allowed = {"routed", "pinned", "base", "peft", "peft-single"}
    if set(systems) - allowed:
        raise SystemExit(f"unknown systems {sorted(set(systems) - allowed)} "
                         f"(allowed: {', '.join(sorted(allowed))})")

    import ray
    from ray import serve

    from modula.serving.app import build_graph

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving_fixtures import free_port  # noqa: E402

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="modula-bench-"))
    base = work / "base"
    t0 = time.time()
    model = build_base(base, args.size)
    ratio = flop_ratio(model, len(DOMAINS), UNIVERSAL_RANK, DOMAIN_RANK)
    params = sum(p.numel() for p in model.parameters())
    del model
    port = free_port()
    cfg = make_config(work / "runs", base, port, args.threads, registry_model=MODEL,
                      gate_report=args.gate_report)
    publish(cfg)
    print(f"{args.size}: {params / 1e6:.1f} M parameters; base model + experts ready in "
          f"{time.time() - t0:.0f}s ({work}); load average {load_start:.1f}", flush=True)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {"routed": "modula", "pinned": "modula", "base": "base", "peft": "peft",
            "peft-single": "peft-single"}
    rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for app in dict.fromkeys(apps[s] for s in systems):
            t0 = time.time()
            if app == "modula":
                bound = build_graph(cfg)
            elif app == "base":
                bound = build_graph(make_config(work / "runs", base, port, args.threads,
                                                base_only=True))
            else:
                bound = peft_app(cfg, naive=app == "peft-single")
            serve.run(bound, name=app, route_prefix=f"/{app}")
            print(f"{app}: deployed in {time.time() - t0:.0f}s", flush=True)
        for system in systems:  # warm up
            asyncio.run(drive(f"http://127.0.0.1:{port}/{apps[system]}",
                              workload(8, 99, system), 4))
        for k in range(args.rounds):
            order = systems[k % len(systems):] + systems[:k % len(systems)]
            for conc in levels:
                for system in order:
                    url = f"http://127.0.0.1:{port}/{apps[system]}"
                    row = asyncio.run(drive(url, workload(args.requests, 1000 * k + conc, system),
                                            conc))
                    rounds.setdefault((system, conc), []).append(row)
                    print(f"  round {k + 1} {system:12s} c={conc:<3d} {row['tokens_per_s']:8.1f} "
                          f"tok/s  p50 {row['p50_s']:6.2f}s  p99 {row['p99_s']:6.2f}s  "
                          f"ttft p50 {row['ttft_p50_s']:5.2f}s  failures {row['failures']}",
                          flush=True)
                    if row["first_error"]:
                        print(f"    first error: {row['first_error']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    load_end = os.getloadavg()[0]

    by = {key: median_rows(rows) for key, rows in rounds.items()}
    summary = summarise(by, ratio["all"])
    summary["flop_ratio_adapted"] = round(ratio["adapted"], 4)
    print_results(args.size, by, summary)
    print(f"load average {load_start:.1f} at start, {load_end:.1f} at end")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = [{"system": s, "concurrency": c, **row} for (s, c), row in by.items()]
        args.out.write_text(json.dumps({
            "size": args.size, "params": params, "model": SIZES[args.size],
            "config": {"requests": args.requests, "rounds": args.rounds,
                       "threads": args.threads, "gate_report": args.gate_report,
                       "load_start": load_start, "load_end": load_end,
                       "machine": platform.machine(), "cpus": os.cpu_count()},
            "results": results, "summary": summary,
            "rounds": [{"system": s, "concurrency": c, "rows": rows}
                       for (s, c), rows in rounds.items()]}, indent=2) + "\n")
        print(f"wrote {args.out}")
        png = plot(args.out.parent)
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
