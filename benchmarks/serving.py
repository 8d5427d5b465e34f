"""Serving benchmark (not part of the tests): throughput and latency of the serving graph.

Side by side in one run, over real HTTP on loopback, at concurrency 1, 8 and 32:

- ``modula``: the MoDULA-Res graph (Ingress -> Router -> Experts, continuous batching), half
  the requests routed by the per-token gates, half pinned to a domain;
- ``base``: the same base model with no adapters, served the same way (``serve.base_only``):
  the limit;
- ``peft``: what users would otherwise do: PEFT with one LoRA adapter per domain, each request
  generated with its domain's adapter; requests batched by ``@serve.batch`` and generated with
  HF ``generate(adapter_names=...)`` (PEFT's mixed-adapter batch), static batching;
- ``peft-single`` (``--naive``): PEFT's plain API, ``set_adapter`` + ``generate`` one request
  at a time.

The base model has the built-in tiny model's architecture (``model.tiny`` of the config),
random weights (throughput does not depend on them); the experts are random too. Every system
gets the same requests: prompts of 20-60 tokens, ``max_tokens`` 16-64 (varied, as real traffic
is), greedy. Reported: requests/s, generated tokens/s, p50 / p99 latency; JSON with ``--out``.

    .venv/bin/python benchmarks/serving.py [--requests 1:16,8:64,32:128] [--out FILE]
"""

import argparse
import asyncio
import json
import os
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


# ----------------------------------------------------------------------------------- models


SIZES = {
    # the built-in model (model.tiny defaults)
    "tiny": {},
    # a larger base: the adapter overhead shrinks as the base layers grow
    "small": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4,
              "intermediate_size": 1408},
}


def build_base(path: Path, size: str) -> None:
    """A tokenizer trained on the interpreter's docs + a random model of the built-in
    architecture (``model.tiny``, or larger), saved as an ordinary HF model directory."""
    import pydoc_data.topics as topics

    from modula.basemodel import build_model
    from modula.config import TinyModelConfig, load_config
    from modula.data.tokenizer import train_tokenizer

    cfg = load_config(None)
    tiny = TinyModelConfig(**{**cfg.model.tiny.model_dump(), **SIZES[size]})
    texts = [t for t in topics.topics.values()]
    tok = train_tokenizer(texts, tiny.vocab_size, path)
    model = build_model(tiny, tok)
    model.save_pretrained(str(path))


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
                  "resources": {"num_cpus": threads}, "registry_poll_s": 30, **serve},
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


def workload(n: int, seed: int, pinned_only: bool, routed_only: bool) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ("the list of values sort key function module import class return number add "
             "convert meter gram stock rose fell price").split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        if routed_only:
            model = MODEL
        elif pinned_only or i % 2:
            model = f"{MODEL}:{DOMAINS[i % len(DOMAINS)]}"
        else:
            model = MODEL
        out.append({"model": model, "prompt": prompt, "max_tokens": rng.randint(16, 64),
                    "temperature": 0})
    return out


async def drive(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    tokens = 0
    failures = 0
    first_error: list[str] = []
    queue = list(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
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
                lat.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"concurrency": concurrency, "requests": len(bodies), "failures": failures,
            "wall_s": round(wall, 3), "req_per_s": round(len(lat) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(pct(0.50), 3),
            "p99_s": round(pct(0.99), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else float("nan"),
            "first_error": first_error[0] if first_error else None}


def measure(name: str, url: str, plan: list[tuple[int, int]], pinned_only: bool = False,
            routed_only: bool = False) -> list[dict[str, Any]]:
    rows = []
    asyncio.run(drive(url, workload(8, 99, pinned_only, routed_only), 4))  # warm up
    for conc, n in plan:
        row = asyncio.run(drive(url, workload(n, conc, pinned_only, routed_only), conc))
        row["system"] = name
        rows.append(row)
        print(f"  {name:12s} c={conc:<3d} {row['req_per_s']:7.2f} req/s "
              f"{row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_s']:6.2f}s  "
              f"p99 {row['p99_s']:6.2f}s  failures {row['failures']}", flush=True)
        if row["first_error"]:
            print(f"    first error: {row['first_error']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", default="1:12,8:48,32:128",
                    help="concurrency:requests pairs (default %(default)s)")
    ap.add_argument("--systems", default="modula,base,peft",
                    help="comma list of modula, base, peft, peft-single")
    ap.add_argument("--naive", action="store_true", help="also run peft-single")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="base model size (default: the built-in tiny model's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPUs (torch threads) per model replica (default 1: on a shared "
                         "2-core machine two OpenMP threads per replica mostly wait)")
    ap.add_argument("--gate-report", choices=["prompt", "all", "off"], default="prompt",
                    help="serve.gate_report of the MoDULA graph (default %(default)s)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    plan = [tuple(int(x) for x in p.split(":")) for p in args.requests.split(",")]
    systems = args.systems.split(",") + (["peft-single"] if args.naive else [])

    import ray
    from ray import serve

    from modula.serving.app import build_graph

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving_fixtures import free_port  # noqa: E402

    work = Path(tempfile.mkdtemp(prefix="modula-bench-"))
    base = work / "base"
    t0 = time.time()
    build_base(base, args.size)
    port = free_port()
    cfg = make_config(work / "runs", base, port, args.threads, registry_model=MODEL,
                      gate_report=args.gate_report)
    publish(cfg)
    print(f"base model + experts ready in {time.time() - t0:.0f}s ({work})", flush=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: list[dict[str, Any]] = []
    try:
        for system in systems:
            t0 = time.time()
            if system == "modula":
                app = build_graph(cfg)
            elif system == "base":
                app = build_graph(make_config(work / "runs", base, port, args.threads,
                                              base_only=True))
            elif system in ("peft", "peft-single"):
                app = peft_app(cfg, naive=system == "peft-single")
            else:
                raise SystemExit(f"unknown system {system!r}")
            serve.run(app, name=system, route_prefix=f"/{system}")
            print(f"{system}: deployed in {time.time() - t0:.0f}s", flush=True)
            url = f"http://127.0.0.1:{port}/{system}"
            results += measure(system, url, plan, pinned_only=system.startswith("peft"),
                               routed_only=system == "base")
            serve.delete(system)
    finally:
        serve.shutdown()
        ray.shutdown()

    print("\nsystem       conc   req/s    tok/s    p50 s   p99 s")
    for r in results:
        print(f"{r['system']:12s} {r['concurrency']:4d} {r['req_per_s']:7.2f} "
              f"{r['tokens_per_s']:8.1f} {r['p50_s']:8.2f} {r['p99_s']:7.2f}")
    by = {(r["system"], r["concurrency"]): r for r in results}
    top = max(c for c, _ in plan)
    summary: dict[str, Any] = {}
    for other in ("base", "peft", "peft-single"):
        if ("modula", top) in by and (other, top) in by and by[other, top]["tokens_per_s"]:
            summary[f"modula_vs_{other}"] = round(by["modula", top]["tokens_per_s"]
                                                  / by[other, top]["tokens_per_s"], 3)
    print(f"\nat concurrency {top} (tokens/s ratios): {summary}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "summary": summary}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
