"""Tiny models and tokenizers for the serving tests, built locally in well under a second.

- :func:`make_tokenizer`: a byte-level BPE trained with ``tokenizers`` on a few hundred lines of
  the interpreter's own documentation, wrapped as a standard HF tokenizer directory with
  bos/eos/pad tokens and a chat template;
- :func:`make_base_model`: a random tiny ``LlamaForCausalLM`` (or any config) saved with
  ``save_pretrained`` next to that tokenizer, so serving loads it as it would a real model dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus(limit: int = 400) -> list[str]:
    import pydoc_data.topics as topics

    lines: list[str] = []
    for text in topics.topics.values():
        for line in text.splitlines():
            line = line.strip()
            if len(line) > 20:
                lines.append(line)
            if len(lines) >= limit:
                return lines
    return lines


def make_tokenizer(path: str | Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer directory at `path`; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def tiny_llama_config(vocab_size: int, **kw: Any):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def make_base_model(path: str | Path, *, seed: int = 0, config: Any = None, **kw: Any):
    """A random tiny causal LM + tokenizer saved at `path`; returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    torch.manual_seed(seed)
    cfg = config or tiny_llama_config(len(tokenizer), **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    _sharpen(model)
    model.eval()
    model.save_pretrained(str(path))
    return model, tokenizer


def _sharpen(model: Any) -> None:
    """Scale the output head so a random model's next-token distribution is peaked: greedy
    choices are then far from ties (robust equality tests across batch shapes)."""
    import torch

    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(8.0)


# ------------------------------------------------------------------------------------------
# a registry with a published MoDULA version


DOMAINS = ["code", "math", "units"]


def serving_config(root: str | Path, base_dir: str | Path, *, variant: str = "res",
                   stages: dict[str, Any] | None = None, splits: dict[str, int] | None = None,
                   storage: dict[str, Any] | None = None, **serve: Any):
    """A validated config serving `base_dir` with experts from the registry under `root`
    (`stages`, `splits`: the training stages' settings and every domain's split sizes, for
    tests that train; `storage`: the whole storage section instead, e.g. an S3 root with its
    endpoint)."""
    from modula.config import config_from_dict

    raw = {
        "storage": storage or {"root": str(root)},
        "cluster": {"dashboard": False},
        "model": {"base": str(base_dir), "max_length": 256},
        "modula": {"variant": variant, "universal_rank": 8, "domain_rank": 4},
        **({"stages": stages} if stages else {}),
        "domains": [{**d, **({"splits": splits} if splits else {})} for d in (
            {"name": "general", "metric": "perplexity"},
            {"name": "code", "metric": "perplexity"},
            {"name": "math"},
            {"name": "units"},
            {"name": "headlines", "metric": "accuracy", "reserved": True},
        )],
        "serve": {
            "max_prompt_tokens": 96,
            "max_tokens_limit": 48,
            "registry_poll_s": 1.0,
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
            "resources": {"num_cpus": 1},
            **serve,
        },
    }
    return config_from_dict(raw)


def randomize_experts(model: Any, seed: int, names: list[str] | None = None) -> None:
    """Give experts and routers non-zero random weights (a trained model's stand-in), so the
    domains really change the output and the gates differ per prompt."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lyr in model.modula_layers().values():
            mods = []
            if names is None or "universal" in names:
                mods.append(lyr.universal)
            for name, e in lyr.experts.items():
                if names is None or name in names:
                    mods.append(e)
            for m in mods:
                if m is None:
                    continue
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if lyr.router is not None and (names is None or "routers" in names):
                w = lyr.router.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)


def publish_model(cfg: Any, domains: list[str], seed: int = 0, workdir: str | Path | None = None,
                  previous: Any = None) -> tuple[int, Any]:
    """Build (or extend) a MoDULA model on the config's base, save its experts and publish them
    as the next registry version. With `previous` (a ModulaModel), add the domains it lacks
    (new experts + new router rows; the old experts stay byte-identical). Returns
    (version, model)."""
    import tempfile

    from modula.basemodel import load_base_model
    from modula.infra.layout import registry_model_name
    from modula.infra.registry import Registry
    from modula.model import attach_modula, save_experts

    if previous is None:
        base, _ = load_base_model(cfg)
        model = attach_modula(base, cfg.modula, list(domains))
        randomize_experts(model, seed)
    else:
        model = previous
        new = [d for d in domains if d not in model.domains]
        for d in new:
            model.add_domain(d)
        randomize_experts(model, seed, names=[*new, "routers"])
    out = Path(workdir or tempfile.mkdtemp(prefix="modula-experts-"))
    save_experts(model, out, cfg.model.base)
    mv = Registry.from_config(cfg).publish(registry_model_name(cfg), out,
                                           metadata={"variant": cfg.modula.variant,
                                                     "base_model": cfg.model.base})
    return mv.version, model


# ------------------------------------------------------------------------------------------
# Serve on loopback: one HTTP proxy per test session, one application per test module


_SERVE: dict[str, Any] = {}
_BASE: dict[str, Path] = {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_serve() -> int:
    """Start Serve once per session (on a free loopback port); returns the HTTP port. Ray
    itself comes from conftest's session-scoped ``ray_local``, whose shutdown ends Serve."""
    from ray import serve

    if "port" not in _SERVE:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _SERVE["port"] = port
    return _SERVE["port"]


def release_serve(app: str) -> None:
    """Delete `app`; shut Serve down once no application is left (later test modules then
    share Ray with no Serve controller and proxy running in the background)."""
    from ray import serve

    serve.delete(app)
    if not serve.status().applications:
        serve.shutdown()
        _SERVE.clear()


def shared_base_dir(tmp_path_factory: Any) -> Path:
    """One tiny base model directory for every serving test module of the session."""
    if "dir" not in _BASE:
        path = tmp_path_factory.mktemp("serving-base")
        make_base_model(path)
        _BASE["dir"] = path
    return _BASE["dir"]


def deploy_published(cfg: Any, app: str, headers: dict[str, str] | None = None, seed: int = 0
                     ) -> tuple[str, int, Any]:
    """Publish a random MoDULA model for `cfg` (the DOMAINS), run the serving graph as the
    application `app` on the session's Serve and wait until it answers; returns (url,
    version, the in-process model)."""
    from ray import serve

    from modula.serving.app import build_graph

    version, model = publish_model(cfg, DOMAINS, seed=seed)
    port = ensure_serve()
    serve.run(build_graph(cfg), name=app, route_prefix=f"/{app}", blocking=False)
    url = f"http://127.0.0.1:{port}/{app}"
    wait_ready(url, headers)
    return url, version, model


def wait_ready(url: str, headers: dict[str, str] | None = None, timeout: float = 120.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready: {last}")


def serve_replicas(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications[app].deployments[deployment]
    return int(st.replica_states.get("RUNNING", 0))


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


class LoadResult:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        # one (start, end, ok) per request, monotonic seconds: what failed when
        self.records: list[tuple[float, float, bool]] = []
        self.disconnected = 0  # streams the client closed on purpose (not failures)

    @property
    def total(self) -> int:
        return len(self.statuses) + len(self.errors)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.statuses if s != 200) + len(self.errors)

    def failed_between(self, start: float, end: float = float("inf")) -> int:
        return sum(1 for t0, _, ok in self.records if start <= t0 < end and not ok)

    def started_between(self, start: float, end: float = float("inf")) -> int:
        return sum(1 for t0, _, _ in self.records if start <= t0 < end)


def _read_sse(lines: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(the last JSON event, an error) of a finished server-sent-event stream."""
    import json

    events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return None, f"stream ended without [DONE] ({len(events)} events)"
    last = None
    for e in events[:-1]:
        obj = json.loads(e)
        if "error" in obj:
            return None, f"error event: {obj['error']}"
        last = obj
    return last, None


def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int,
             headers: dict[str, str] | None = None, *, stop: Any = None,
             timeout: float = 60.0) -> LoadResult:
    """POST `bodies` (cycled until `stop` is set when given, else each once) to
    ``/v1/completions`` or ``/v1/chat/completions`` (by shape) from `concurrency` workers.

    A body with ``"stream": true`` is read to its end (``[DONE]``, no error event); with
    ``"_disconnect_after": n`` (not sent) the client closes the stream after n events, as a
    client that goes away does. `timeout` bounds each whole request: one that takes longer
    counts as failed (hung)."""
    import asyncio
    import itertools
    import time

    import httpx

    res = LoadResult()

    async def one(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> bool:
        cut = body.get("_disconnect_after")
        payload = {k: v for k, v in body.items() if not k.startswith("_")}
        if not payload.get("stream"):
            r = await client.post(url + path, json=payload)
            res.statuses.append(r.status_code)
            try:
                res.bodies.append(r.json())
            except ValueError:
                res.bodies.append({"raw": r.text})
            return r.status_code == 200
        lines: list[str] = []
        async with client.stream("POST", url + path, json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                res.statuses.append(r.status_code)
                res.bodies.append({"raw": r.text})
                return False
            async for line in r.aiter_lines():
                lines.append(line)
                if cut is not None and sum(ln.startswith("data: ") for ln in lines) >= cut:
                    res.disconnected += 1
                    res.statuses.append(200)
                    res.bodies.append({"disconnected": True})
                    return True
        last, err = _read_sse(lines)
        if err:
            raise RuntimeError(err)
        res.statuses.append(200)
        res.bodies.append(last or {})
        return True

    async def main() -> None:
        it = itertools.cycle(bodies) if stop is not None else iter(bodies)
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            async def worker() -> None:
                while stop is None or not stop.is_set():
                    try:
                        body = next(it)
                    except StopIteration:
                        return
                    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                    t0 = time.perf_counter()
                    m0, ok = time.monotonic(), False
                    try:
                        ok = await asyncio.wait_for(one(client, path, body), timeout)
                    except asyncio.TimeoutError:
                        res.errors.append(f"hung: no answer in {timeout:.0f} s")
                    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                        res.errors.append(repr(exc))
                    else:
                        res.latencies.append(time.perf_counter() - t0)
                    res.records.append((m0, time.monotonic(), ok))

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())
    return res
