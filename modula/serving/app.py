"""The Ray Serve application: ``Ingress`` (OpenAI API) -> ``Router`` -> expert deployments.

- :class:`Ingress`: FastAPI, OpenAI-compatible (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, server-sent-event streaming), API keys, Prometheus ``/metrics``.
  It validates and tokenises every request, so bad input is a 4xx before anything is routed.
- :class:`Router`: the request-level router. With one expert deployment (the default) it only
  forwards; with several (``serve.experts_per_deployment``), a pinned request goes to the group
  holding its domain and a routed one to the group with the most gate mass for its prompt (one
  batched routing forward of the full model, no generation). It retries a request whose replica
  died before answering, so a lost replica costs no request that had not started streaming.
- :class:`Experts`: the base model plus a group of experts, generating with continuous batching
  (:mod:`modula.serving.engine`). New requests are admitted through ``@serve.batch`` (one
  prefill forward for all, each row with its own domain); the running batch then decodes token
  by token. Each replica polls the registry and swaps in a new version without a restart:
  requests in flight finish on the old model, new ones start on the new.

:func:`build_app` is the builder named in the Serve config that ``modula render --target
serve`` writes (``args: {config: <the config, secrets removed>}``); :func:`build_graph` builds
the same graph from a :class:`ModulaConfig` in process (``modula serve``).
"""


import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from modula.config.loader import ConfigError, config_from_dict
from modula.config.schema import ModulaConfig
from modula.data.tokenizer import render_chat
from modula.serving import topology
from modula.serving.engine import AsyncEngine, EngineCore, Failed, Finished, TokenDelta
from modula.serving.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from modula.serving.metrics import ServingMetrics
from modula.serving.modeling import ModelSource, RoutingModel, configure_torch, load_tokenizer
from modula.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    Limits,
    Routing,
    SamplingParams,
    chat_choice,
    chat_chunk,
    chat_response,
    check_api_key,
    check_limits,
    check_prompt_length,
    completion_choice,
    completion_chunk,
    completion_prompts,
    completion_response,
    hash_api_key,
    model_list,
    new_id,
    parse_json_body,
    parse_model_name,
    parse_request,
    resolve_max_tokens,
    routing_extension,
    sse,
    total_usage,
    unknown_domain,
)

__all__ = [
    "API_KEYS_ENV",
    "Experts",
    "Ingress",
    "Router",
    "build_app",
    "build_graph",
    "replica_config",
]

log = logging.getLogger("modula.serving")

API_KEYS_ENV = "MODULA_API_KEYS"
_RETRYABLE_ATTEMPTS = 4


def replica_config(cfg: ModulaConfig) -> dict[str, Any]:
    """The config as plain data for the replicas: API keys removed (the ingress gets their
    hashes), storage credentials kept only if the config has them (a deployed file has none:
    its pods read them from the environment)."""
    return cfg.to_data(secrets="drop", reveal=("storage",))


def _config(config: Mapping[str, Any] | ModulaConfig) -> ModulaConfig:
    if isinstance(config, ModulaConfig):
        return config
    try:
        return config_from_dict(dict(config), source="(serve args)")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def env_key_hashes() -> list[str]:
    """Hashes of the keys in ``$MODULA_API_KEYS`` (comma-separated)."""
    raw = os.environ.get(API_KEYS_ENV, "")
    return [hash_api_key(k.strip()) for k in raw.split(",") if k.strip()]


def _unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error (APIError keeps its status)."""
    seen = 0
    while seen < 5:
        if isinstance(exc, APIError):
            return exc
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            return exc
        exc = cause
        seen += 1
    return exc


def _retryable(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    try:
        from ray.serve.exceptions import ReplicaUnavailableError
    except ImportError:  # pragma: no cover - older ray
        ReplicaUnavailableError = RayActorError  # noqa: N806
    return isinstance(exc, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError,
                            BackPressureError))


async def _with_retries(call: Callable[[], Awaitable[Any]]) -> Any:
    """``await call()``, again after a growing pause while it fails because a replica was lost
    (an APIError or any other failure is raised at once)."""
    delay = 0.05
    for attempt in range(_RETRYABLE_ATTEMPTS):
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001
            err = _unwrap(exc)
            if isinstance(err, APIError) or not _retryable(err) \
                    or attempt == _RETRYABLE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(delay)
            delay *= 2
    raise RuntimeError("unreachable")


def _replica_tag() -> str:
    try:
        ctx = serve.get_replica_context()
        return str(ctx.replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside Serve (tests)
        return "local"


# ============================================================================ expert replicas


@serve.deployment(max_ongoing_requests=32, health_check_period_s=5.0,
                  graceful_shutdown_timeout_s=60.0)
class Experts:
    """Base model + a group of experts; continuous batching; hot reload from the registry."""

    def __init__(self, config: Mapping[str, Any], group_index: int = 0,
                 group: Sequence[str] | None = None, extra_domains: bool = True,
                 deployment_name: str = topology.EXPERT_PREFIX):
        self.cfg = _config(config)
        configure_torch(self.cfg)
        self.name = deployment_name
        self.group_index = group_index
        self.source = ModelSource(self.cfg, group=list(group) if group is not None else None,
                                  extra_domains=extra_domains)
        self.tokenizer = self.source.tokenizer()
        adapter = self.source.load(self.source.latest_version())
        self._engine = self._make_engine(adapter)
        self._draining: set[Any] = set()
        self._reload_lock: asyncio.Lock | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._failed_versions: dict[Any, float] = {}
        self._reloads = 0
        b = self.cfg.serve.batching
        self._admit.set_max_batch_size(b.max_batch_size)
        self._admit.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        log.info("%s replica ready: version %s, domains %s", self.name, adapter.version,
                 adapter.domains)

    def _make_engine(self, adapter: Any) -> Any:
        s = self.cfg.serve
        core = EngineCore(adapter, self.tokenizer,
                          max_running=max(2 * s.batching.max_batch_size, 4),
                          max_context=s.max_prompt_tokens + s.max_tokens_limit + 1,
                          gate_report=s.gate_report)
        return AsyncEngine(core)

    # ---------------------------------------------------------------- admission

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _admit(self, reqs: list[GenerationRequest]) -> list[Any]:
        """One admission group: every request of the batch enters the engine together, so
        their prompts are prefilled in one forward (each row with its own domain)."""
        self._ensure_poller()
        engine = self._engine
        out: list[Any] = []
        for req in reqs:
            try:
                out.append(engine.submit(req, self._routing(engine.adapter, req)))
            except APIError as exc:
                out.append(exc)
        return out

    def _routing(self, adapter: Any, req: GenerationRequest) -> Any:
        """The request's routing over this replica's experts: 404 for an expert it does not
        have (as for model names), 400 for a routing the model cannot do."""
        route = req.route()
        try:
            return adapter.row_routing(route)
        except KeyError as exc:
            param = {"pinned": "model", "weights": "modula.weights"}.get(route.mode,
                                                                          "modula.domains")
            raise unknown_domain(req.model or self.cfg.serve.model_name, str(exc.args[0]),
                                 adapter.domains, param) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="modula", code="invalid_value") from None

    async def _start(self, req: GenerationRequest) -> Any:
        res = await self._admit(req)
        if isinstance(res, APIError) and res.code == "model_not_found":
            # maybe a domain that a newer registry version added: look before refusing
            if await self.reload():
                res = await self._admit(req)
        if isinstance(res, APIError):
            raise res
        return res

    def _stamp(self, res: GenerationResult) -> GenerationResult:
        res.info["deployment"] = self.name
        res.info["replica"] = _replica_tag()
        return res

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        stream = await self._start(req)
        return self._stamp(await stream.result())

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Text deltas as they come (several tokens per item when the consumer is slower than
        the engine), then one item with the result."""
        stream = await self._start(req)
        try:
            async for ev in stream:
                events = [ev, *stream.drain_nowait()]
                text, first, end, logprobs, prompt_lp = [], False, None, [], None
                for e in events:
                    if isinstance(e, TokenDelta):
                        text.append(e.text)
                        first |= e.first
                        logprobs += e.logprobs or []
                        prompt_lp = e.prompt_logprobs or prompt_lp
                    elif isinstance(e, Finished):
                        text.append(e.last_delta)
                        end = e.result
                    elif isinstance(e, Failed):
                        raise RuntimeError(f"generation failed: {e.error}") from e.error
                item: dict[str, Any] = {"text": "".join(text)}
                if first:
                    item["first_token_at"] = time.time()
                if logprobs:
                    item["logprobs"] = logprobs
                if prompt_lp is not None:
                    item["prompt_logprobs"] = prompt_lp
                if end is not None:
                    item["result"] = self._stamp(end)
                    yield item
                    return
                yield item
        finally:
            stream.cancel()

    # ---------------------------------------------------------------- registry

    def _ensure_poller(self) -> None:
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        if self.source.polls and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.registry_poll_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - keep serving the current version
                log.exception("%s: registry poll failed", self.name)

    async def reload(self) -> bool:
        """Load the registry's latest version if it is newer than the one served; True if it
        changed. Requests in flight finish on the old model."""
        self._ensure_poller()
        assert self._reload_lock is not None
        async with self._reload_lock:
            latest = await asyncio.to_thread(self.source.latest_version)
            current = self._engine.adapter.version
            if latest is None or latest == current:
                return False
            if time.monotonic() < self._failed_versions.get(latest, 0.0):
                return False
            try:
                adapter = await asyncio.to_thread(self.source.load, latest)
            except Exception:  # noqa: BLE001 - a bad version must not take the replica down
                log.exception("%s: cannot load version %s; still serving %s", self.name,
                              latest, current)
                self._failed_versions[latest] = time.monotonic() + 60.0
                return False
            old, self._engine = self._engine, self._make_engine(adapter)
            self._reloads += 1
            log.info("%s: now serving version %s (domains %s); draining version %s",
                     self.name, latest, adapter.domains, current)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
            return True

    async def _retire(self, engine: Any) -> None:
        await engine.drain()
        await engine.close()

    # ---------------------------------------------------------------- info

    async def info(self) -> dict[str, Any]:
        self._ensure_poller()
        a = self._engine.adapter
        return {
            "deployment": self.name,
            "group": self.group_index,
            "replica": _replica_tag(),
            "version": a.version,
            "domains": list(a.domains),
            "experts": list(a.gate_names or []),
            "reloads": self._reloads,
            "in_flight": self._engine.in_flight,
            "draining": len(self._draining),
            "engine": self._engine.core.stats.as_dict(),
            **a.info,
        }

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        with contextlib.suppress(Exception):
            self.source.cleanup()

    async def check_health(self) -> None:
        """Serve calls this periodically: a dead engine loop restarts the replica."""
        self._ensure_poller()
        task = self._engine._task
        if task is not None and task.done() and not self._engine._closed:
            exc = task.exception() if not task.cancelled() else None
            raise RuntimeError(f"{self.name}: the engine loop stopped ({exc!r})")


# ============================================================================ router


@serve.deployment(max_ongoing_requests=512)
class Router:
    """Picks the expert deployment of each request and forwards it (retrying lost replicas)."""

    def __init__(self, config: Mapping[str, Any], groups: Sequence[Sequence[str]],
                 experts: Sequence[DeploymentHandle]):
        self.cfg = _config(config)
        self.groups = [list(g) for g in groups]
        self.experts = list(experts)
        if len(self.experts) != max(1, len(self.groups)):
            raise ValueError(f"{len(self.experts)} expert deployments for "
                             f"{len(self.groups)} groups")
        self._domain_map: dict[str, int] = {}
        self._map_at = 0.0
        self._routing = None
        if len(self.experts) > 1:
            configure_torch(self.cfg)
            self._routing = RoutingModel(self.cfg)
            b = self.cfg.serve.batching
            self._route_batch.set_max_batch_size(b.max_batch_size)
            self._route_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    # ---------------------------------------------------------------- choosing

    async def _infos(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(h.info.remote() for h in self.experts)))

    async def _refresh_map(self) -> None:
        infos = await self._infos()
        m: dict[str, int] = {}
        for i, info in enumerate(infos):
            for d in info["domains"]:
                m.setdefault(d, i)
        self._domain_map = m
        self._map_at = time.monotonic()

    async def _group_of(self, domain: str, model: str, param: str = "model") -> int:
        stale = time.monotonic() - self._map_at > self.cfg.serve.registry_poll_s
        if domain not in self._domain_map or stale:
            await self._refresh_map()
        if domain not in self._domain_map:
            # a replica may not have loaded a new version yet: ask them to look
            await asyncio.gather(*(h.reload.remote() for h in self.experts),
                                 return_exceptions=True)
            await self._refresh_map()
        if domain not in self._domain_map:
            raise unknown_domain(model, domain, sorted(self._domain_map), param)
        return self._domain_map[domain]

    async def _group_of_routing(self, req: GenerationRequest) -> tuple[int | None,
                                                                        GenerationRequest]:
        """The group that holds every expert a weighted or restricted request names (the
        universal expert is in every group); zero weights are dropped, so they need no group.
        None when only the universal expert is named."""
        route = req.route()
        if route.weights is not None:
            kept = tuple((n, w) for n, w in route.weights if w > 0)
            req = dataclasses.replace(req, routing=Routing(weights=kept))
            names, param = [n for n, _ in kept], "modula.weights"
        else:
            names, param = list(route.allowed or ()), "modula.domains"
        groups = {await self._group_of(n, req.model, param)
                  for n in names if n != "universal"}
        if len(groups) > 1:
            raise APIError(400, f"The experts named in {param} are served by different expert "
                                "deployments (serve.experts_per_deployment); name experts of "
                                "one group.", param=param, code="unsupported_value")
        return (groups.pop() if groups else None), req

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _route_batch(self, reqs: list[GenerationRequest]) -> list[dict[str, float]]:
        assert self._routing is not None
        return await asyncio.to_thread(self._routing.gates, [r.prompt_ids for r in reqs])

    async def pick(self, req: GenerationRequest) -> tuple[int, GenerationRequest]:
        """The index of the expert deployment for `req` (and the request as sent there)."""
        if len(self.experts) == 1:
            return 0, req
        if req.domain is not None:
            return await self._group_of(req.domain, req.model), req
        if req.routing is not None and req.route().mode != "routed":
            group, req = await self._group_of_routing(req)
            if group is not None:
                return group, req
        gates = await self._route_batch(req)
        if time.monotonic() - self._map_at > self.cfg.serve.registry_poll_s:
            await self._refresh_map()
        mass = [0.0] * len(self.experts)
        for d, w in gates.items():
            if d in self._domain_map:
                mass[self._domain_map[d]] += w
        return max(range(len(mass)), key=lambda i: (mass[i], -i)), req

    # ---------------------------------------------------------------- forwarding

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        idx, req = await self.pick(req)
        delay = 0.05
        for attempt in range(_RETRYABLE_ATTEMPTS):
            try:
                return await self.experts[idx].generate.remote(req)
            except Exception as exc:  # noqa: BLE001
                err = _unwrap(exc)
                if isinstance(err, APIError):
                    raise err from None
                if not _retryable(err) or attempt == _RETRYABLE_ATTEMPTS - 1:
                    raise
                log.warning("request %s: replica lost (%s); retrying", req.request_id,
                            type(err).__name__)
                await asyncio.sleep(delay)
                delay *= 2
        raise RuntimeError("unreachable")

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        idx, req = await self.pick(req)
        delay = 0.05
        for attempt in range(_RETRYABLE_ATTEMPTS):
            sent = False
            try:
                gen = self.experts[idx].options(stream=True).generate_stream.remote(req)
                async for item in gen:
                    sent = True
                    yield item
                return
            except Exception as exc:  # noqa: BLE001
                err = _unwrap(exc)
                if isinstance(err, APIError):
                    raise err from None
                if sent or not _retryable(err) or attempt == _RETRYABLE_ATTEMPTS - 1:
                    raise
                log.warning("stream %s: replica lost (%s); retrying", req.request_id,
                            type(err).__name__)
                await asyncio.sleep(delay)
                delay *= 2

    async def models(self) -> dict[str, Any]:
        infos = await self._infos()
        domains: list[str] = []
        for info in infos:
            for d in info["domains"]:
                if d not in domains:
                    domains.append(d)
        return {"domains": domains, "deployments": infos}


# ============================================================================ ingress

api = FastAPI(title="modula", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = {404: f"Unknown request URL: {request.method} {request.url.path}.",
           405: f"Method {request.method} is not allowed for {request.url.path}."}.get(
        exc.status_code, str(exc.detail))
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(APIError(exc.status_code, msg, code=code))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(APIError(400, f"Invalid request: {exc.errors()[:1]}",
                                    code="invalid_value"))


@dataclasses.dataclass
class _Choice:
    """One choice of a response: its index, the prompt it continues, its generation, and the
    prompt's text when it is echoed."""

    index: int
    prompt_index: int
    gen: GenerationRequest
    echo: str | None = None


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    """The OpenAI-compatible HTTP front door."""

    def __init__(self, config: Mapping[str, Any], router: DeploymentHandle,
                 api_key_hashes: Sequence[str] = ()):
        self.cfg = _config(config)
        s = self.cfg.serve
        self.router = router
        self.served = s.model_name
        self.key_hashes = sorted({*api_key_hashes, *env_key_hashes(),
                                  *(hash_api_key(k.get_secret_value()) for k in s.api_keys)})
        self.tokenizer = load_tokenizer(self.cfg)
        self.texts = TokenTexts(self.tokenizer)
        self.vocab = len(self.tokenizer)
        self.limits = Limits.from_config(s)
        self.unknown = s.unknown_fields
        self.max_model_len = s.max_prompt_tokens + s.max_tokens_limit
        self.max_body = s.max_request_bytes
        self.metrics = ServingMetrics()
        self.created = int(time.time())

    # ---------------------------------------------------------------- helpers

    def _auth(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization"), self.key_hashes)

    async def _body(self, request: Request) -> dict[str, Any]:
        return parse_json_body(await request.body(), self.max_body)

    def _tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range [0, {self.vocab}).",
                           param=param, code="invalid_value")

    def _chat_ids(self, messages: Sequence[Any], add_generation_prompt: bool = True
                  ) -> list[int]:
        rows = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in messages]
        try:
            if add_generation_prompt:
                text = render_chat(self.tokenizer, rows)
            else:
                text = self.tokenizer.apply_chat_template(rows, tokenize=False,
                                                          add_generation_prompt=False)
        except Exception as exc:  # noqa: BLE001 - a template that refuses these messages
            raise APIError(400, f"The messages cannot be rendered by the model's chat "
                                f"template: {exc}", param="messages",
                           code="invalid_value") from None
        return self._tokens(text, special=False)

    def _plan(self, req: CompletionRequest | ChatCompletionRequest, kind: str,
              rid: str) -> list[_Choice]:
        """One generation per choice: every prompt of a batch, `n` times each (choice index
        ``prompt * n + j``; a seeded request's choice j samples with seed + j)."""
        pinned = parse_model_name(req.model, self.served)
        routing = routing_extension(req, pinned)
        check_limits(req, self.limits)
        max_tokens = resolve_max_tokens(req, self.limits)
        prompts: list[tuple[list[int], str | None]] = []
        if isinstance(req, CompletionRequest):
            given = completion_prompts(req, self.limits)
            for i, p in enumerate(given):
                param = "prompt" if len(given) == 1 else f"prompt.{i}"
                if isinstance(p, str):
                    ids = self._tokens(p, special=True)
                else:
                    ids = list(p)
                    self._check_ids(ids, param)
                check_prompt_length(len(ids), self.limits, param)
                echo = None
                if req.echo:
                    echo = p if isinstance(p, str) else self.tokenizer.decode(
                        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                prompts.append((ids, echo))
        else:
            ids = self._chat_ids(req.messages)
            check_prompt_length(len(ids), self.limits, "messages")
            prompts.append((ids, None))
        n = req.n or 1
        if len(prompts) * n > self.limits.max_batch_prompts:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; "
                                f"at most {self.limits.max_batch_prompts} per request.",
                           param="n", code="invalid_value")
        self._check_ids(req.stop_token_ids or [], "stop_token_ids")
        self._check_ids([int(k) for k in req.logit_bias or {}], "logit_bias")
        ext = routing if routing.mode in ("weights", "domains") else None
        many = len(prompts) * n > 1
        out = []
        for pi, (ids, echo) in enumerate(prompts):
            for j in range(n):
                index = pi * n + j
                params = SamplingParams.from_request(req, max_tokens, seed_offset=j)
                gen = GenerationRequest(f"{rid}-{index}" if many else rid, tuple(ids), params,
                                        pinned, req.model, routing=ext)
                out.append(_Choice(index, pi, gen, echo))
        return out

    def _choice_body(self, kind: str, c: _Choice, res: GenerationResult,
                     extension: dict[str, Any] | None) -> dict[str, Any]:
        p = c.gen.params
        if kind == "chat":
            lp = (chat_logprobs(self.texts, res.logprobs or [], c.gen.prompt_ids)
                  if p.logprobs is not None else None)
            return chat_choice(c.index, res.text, res.finish_reason, lp, extension)
        text = (c.echo or "") + res.text
        lp = None
        if p.logprobs is not None:
            entries: list[Any] = list(res.logprobs or [])
            ids = [e[0] for e in entries]
            before: Sequence[int] = c.gen.prompt_ids
            if c.echo is not None:
                entries = [*(res.prompt_logprobs or [None] * len(c.gen.prompt_ids)), *entries]
                ids = [*c.gen.prompt_ids, *ids]
                before = ()
            lp = completion_logprobs(self.texts, entries, ids, before)
        return completion_choice(c.index, text, res.finish_reason, lp, extension)

    def _extension(self, res: GenerationResult, req: Any) -> dict[str, Any]:
        ext = res.extension()
        if req.ignored_fields:
            ext["ignored_fields"] = req.ignored_fields
        return ext

    # ---------------------------------------------------------------- routes

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            info = await self.router.models.remote()
        except Exception as exc:  # noqa: BLE001
            return self._fail("models", exc, t0)
        self.metrics.request_done("models", 200, time.perf_counter() - t0, False)
        return JSONResponse(model_list(self.served, info["domains"], self.created,
                                       {"deployments": info["deployments"]}))

    @api.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            domain = parse_model_name(model_id, self.served)
            info = await self.router.models.remote()
            if domain is not None and domain not in info["domains"]:
                raise unknown_domain(model_id, domain, info["domains"])
        except Exception as exc:  # noqa: BLE001
            return self._fail("models", exc, t0)
        entries = model_list(self.served, info["domains"], self.created)["data"]
        self.metrics.request_done("models", 200, time.perf_counter() - t0, False)
        return JSONResponse(next(e for e in entries if e["id"] == model_id))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: the token ids of a prompt, or of chat messages rendered by
        the chat template (``add_special_tokens``: default true for a prompt, false for
        messages, as vLLM)."""
        t0 = time.perf_counter()
        try:
            self._auth(request)
            req = parse_request("tokenize", await self._body(request), self.unknown)
            if req.model is not None:
                parse_model_name(req.model, self.served)
            if req.prompt is not None:
                special = True if req.add_special_tokens is None else req.add_special_tokens
                ids = self._tokens(req.prompt, special=special)
            else:
                ids = self._chat_ids(req.messages or [], req.add_generation_prompt)
                if req.add_special_tokens:
                    ids = list(self.tokenizer.build_inputs_with_special_tokens(ids))
        except Exception as exc:  # noqa: BLE001
            return self._fail("tokenize", exc, t0)
        self.metrics.request_done("tokenize", 200, time.perf_counter() - t0, False)
        return JSONResponse({
            "count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
            "token_strs": (self.tokenizer.convert_ids_to_tokens(ids)
                           if req.return_token_strs else None)})

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``/detokenize``: the text of token ids."""
        t0 = time.perf_counter()
        try:
            self._auth(request)
            req = parse_request("detokenize", await self._body(request), self.unknown)
            if req.model is not None:
                parse_model_name(req.model, self.served)
            self._check_ids(req.tokens, "tokens")
            text = self.tokenizer.decode(req.tokens, skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
        except Exception as exc:  # noqa: BLE001
            return self._fail("tokenize", exc, t0)
        self.metrics.request_done("tokenize", 200, time.perf_counter() - t0, False)
        return JSONResponse({"prompt": text})

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's ``/tokenizer_info``: the tokenizer's class, special tokens and chat template
        (enough for a client to tokenise and render chats as the service does)."""
        t0 = time.perf_counter()
        try:
            self._auth(request)
        except Exception as exc:  # noqa: BLE001
            return self._fail("tokenize", exc, t0)
        tok = self.tokenizer
        info = {"tokenizer_class": type(tok).__name__,
                "model_max_length": self.max_model_len, "vocab_size": self.vocab,
                "chat_template": getattr(tok, "chat_template", None)}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = str(value) if value is not None else None
        self.metrics.request_done("tokenize", 200, time.perf_counter() - t0, False)
        return JSONResponse(info)

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        body, ctype = self.metrics.render()
        return Response(body, media_type=ctype)

    @api.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    # ---------------------------------------------------------------- generation

    def _fail(self, endpoint: str, exc: BaseException, t0: float) -> JSONResponse:
        err = _unwrap(exc)
        if not isinstance(err, APIError):
            if _retryable(err):
                err = APIError(503, "The service is temporarily unavailable; retry the "
                                    "request.", code="service_unavailable")
            else:
                log.error("internal error on %s: %r", endpoint, err, exc_info=err)
                err = APIError(500, "The server had an error while processing your request.",
                               code="internal_error")
        self.metrics.request_done(endpoint, err.status, time.perf_counter() - t0, False)
        return _error_response(err)

    async def _generate(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        endpoint = "completions" if kind == "completion" else "chat"
        rid = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.metrics.in_flight.inc()
        streaming = False
        try:
            self._auth(request)
            body = await self._body(request)
            req = parse_request(kind, body, self.unknown)
            if req.ignored_fields:
                log.warning("request %s: ignored unknown fields %s", rid, req.ignored_fields)
            choices = self._plan(req, kind, rid)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                resp = await self._stream(req, rid, choices, kind, endpoint, include_usage, t0)
                streaming = True
                return resp
            results = await self._run_all(choices)
        except Exception as exc:  # noqa: BLE001
            return self._fail(endpoint, exc, t0)
        finally:
            if not streaming:
                self.metrics.in_flight.dec()
        created = int(time.time())
        many = len(choices) > 1
        bodies = [self._choice_body(kind, c, r, r.extension() if many else None)
                  for c, r in zip(choices, results, strict=True)]
        usage = total_usage(results, [c.prompt_index for c in choices])
        ext = self._extension(results[0], req)
        build = completion_response if kind == "completion" else chat_response
        body_out = build(rid, req.model, created, results, choices=bodies, usage=usage,
                         extension=ext)
        for r in results:
            self.metrics.generation_done(r.prompt_tokens, r.completion_tokens, r.domain, r.gates)
            ttft = r.info.get("ttft_s")
            if ttft is not None:
                self.metrics.first_token(endpoint, float(ttft))
        self.metrics.request_done(endpoint, 200, time.perf_counter() - t0, False)
        return JSONResponse(body_out)

    async def _run_all(self, choices: Sequence[_Choice]) -> list[GenerationResult]:
        """Every choice's result (sent side by side: the expert replicas batch them); the
        first failure is raised after all have ended."""
        got = await asyncio.gather(*(self._call_router(c.gen) for c in choices),
                                   return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return list(got)  # type: ignore[arg-type]

    async def _call_router(self, gen: GenerationRequest) -> GenerationResult:
        """The router's answer; a router replica lost before answering is retried."""
        return await _with_retries(lambda: self.router.generate.remote(gen))

    async def _open_stream(self, gen: GenerationRequest) -> tuple[Any, dict[str, Any]]:
        """A stream from the router and its first item (errors such as an unknown domain
        surface here, before any byte is sent, so they become a 4xx)."""

        async def first() -> tuple[Any, dict[str, Any]]:
            stream = self.router.options(stream=True).generate_stream.remote(gen)
            try:
                return stream, await stream.__anext__()
            except StopAsyncIteration:
                raise RuntimeError("the expert deployment ended the stream at once") from None

        return await _with_retries(first)

    async def _stream(self, req: Any, rid: str, choices: Sequence[_Choice], kind: str,
                      endpoint: str, include_usage: bool, t0: float) -> Response:
        opened = await asyncio.gather(*(self._open_stream(c.gen) for c in choices),
                                      return_exceptions=True)
        failed = [o for o in opened if isinstance(o, BaseException)]
        if failed:
            for o in opened:
                if not isinstance(o, BaseException):
                    o[0].cancel()
            raise failed[0]
        model, created = req.model, int(time.time())
        metrics = self.metrics
        texts = self.texts
        many = len(choices) > 1

        def chunk(c: _Choice, text: str, finish: str | None = None,
                  ext: dict[str, Any] | None = None, role: bool = False,
                  lp: dict[str, Any] | None = None) -> bytes:
            if kind == "completion":
                return sse(completion_chunk(rid, model, created, text, finish, extension=ext,
                                            index=c.index, logprobs=lp))
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text or finish is None else {})
            return sse(chat_chunk(rid, model, created, delta, finish, extension=ext,
                                  index=c.index, logprobs=lp))

        class _State:
            def __init__(self, c: _Choice):
                self.c = c
                self.context = list(c.gen.prompt_ids)  # tokens before the next reported one
                self.sent = 0  # logprob entries sent
                self.offset = 0  # text offset of the next token (summed token texts)
                self.started = False

        def logprobs_of(st: _State, entries: Sequence[Any]) -> dict[str, Any] | None:
            if st.c.gen.params.logprobs is None:
                return None
            ids = [e[0] for e in entries]
            if kind == "chat":
                lp = chat_logprobs(texts, entries, st.context)
            else:
                lp = completion_logprobs(texts, entries, ids, st.context, st.offset)
                st.offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
            st.context += ids
            st.sent += len(entries)
            return lp

        def start(st: _State, item: dict[str, Any]) -> list[bytes]:
            """The first chunk of a choice: the role (chat) or the echoed prompt."""
            st.started = True
            c = st.c
            if kind == "chat":
                return [chunk(c, "", role=True)]
            if c.echo is None:
                return []
            lp = None
            if c.gen.params.logprobs is not None:
                res = item.get("result")
                entries = item.get("prompt_logprobs") or (
                    res.prompt_logprobs if res is not None else None) or [None] * len(
                    c.gen.prompt_ids)
                lp = completion_logprobs(texts, entries, c.gen.prompt_ids)
                st.context = list(c.gen.prompt_ids)
                st.offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
            return [chunk(c, c.echo, lp=lp)]

        def on_item(st: _State, item: dict[str, Any]) -> tuple[list[bytes], Any]:
            out = [] if st.started else start(st, item)
            res: GenerationResult | None = item.get("result")
            text = item.get("text") or ""
            entries = (res.logprobs or [])[st.sent:] if res is not None else (
                item.get("logprobs") or [])
            lp = logprobs_of(st, entries) if entries else None
            if text or lp:
                out.append(chunk(st.c, text, lp=lp))
            if res is not None:
                ext = res.extension()
                if not many and req.ignored_fields:
                    ext["ignored_fields"] = req.ignored_fields
                out.append(chunk(st.c, "", res.finish_reason, ext))
            return out, res

        async def pump(i: int, stream: Any, first_item: dict[str, Any],
                       queue: asyncio.Queue) -> None:
            try:
                queue.put_nowait((i, first_item))
                while "result" not in first_item:
                    first_item = await stream.__anext__()
                    queue.put_nowait((i, first_item))
            except StopAsyncIteration:
                queue.put_nowait((i, RuntimeError("the stream ended without a result")))
            except BaseException as exc:  # noqa: BLE001 - reported in the stream
                queue.put_nowait((i, exc))

        async def body() -> AsyncIterator[bytes]:
            status = 200
            first_token_seen = False
            queue: asyncio.Queue = asyncio.Queue()
            states = [_State(c) for c in choices]
            tasks = [asyncio.create_task(pump(i, o[0], o[1], queue))
                     for i, o in enumerate(opened)]
            results: dict[int, GenerationResult] = {}
            try:
                while len(results) < len(choices):
                    i, item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if not first_token_seen and ("first_token_at" in item or item.get("text")):
                        first_token_seen = True
                        metrics.first_token(endpoint, time.perf_counter() - t0)
                    chunks, res = on_item(states[i], item)
                    for b in chunks:
                        yield b
                    if res is not None:
                        results[i] = res
                        metrics.generation_done(res.prompt_tokens, res.completion_tokens,
                                                res.domain, res.gates)
                if include_usage:
                    ordered = [results[i] for i in range(len(choices))]
                    usage = total_usage(ordered, [c.prompt_index for c in choices])
                    yield sse((completion_chunk if kind == "completion" else chat_chunk)(
                        rid, model, created, "" if kind == "completion" else {},
                        usage=usage, usage_only=True))
                yield sse("[DONE]")
            except asyncio.CancelledError:
                status = 499  # the client went away
                raise
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
                err = _unwrap(exc)
                if not isinstance(err, APIError):
                    log.error("stream %s failed: %r", rid, err)
                    err = APIError(500, "The server had an error while generating.",
                                   code="internal_error")
                status = err.status
                yield sse(err.body())
            finally:
                for t in tasks:
                    t.cancel()
                for o in opened:
                    o[0].cancel()
                metrics.in_flight.dec()
                metrics.request_done(endpoint, status, time.perf_counter() - t0, True)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ============================================================================ building


def build_graph(cfg: ModulaConfig, *, api_key_hashes: Sequence[str] = (),
                config_data: Mapping[str, Any] | None = None) -> Any:
    """The bound application (Ingress -> Router -> expert deployments) for `cfg`."""
    data = dict(config_data) if config_data is not None else replica_config(cfg)
    keys = sorted({*api_key_hashes,
                   *(hash_api_key(k.get_secret_value()) for k in cfg.serve.api_keys)})
    opts = topology.deployment_options(cfg)
    groups = topology.expert_groups(cfg)
    names = topology.expert_deployment_names(cfg)
    experts = []
    for i, name in enumerate(names):
        group = groups[i] if len(names) > 1 else None
        experts.append(Experts.options(name=name, **opts.get(name, {})).bind(
            data, i, group, i == len(names) - 1, name))
    router = Router.options(name=topology.ROUTER, **opts.get(topology.ROUTER, {})).bind(
        data, groups if len(names) > 1 else [], experts)
    return Ingress.options(name=topology.INGRESS, **opts.get(topology.INGRESS, {})).bind(
        data, router, keys)


def build_app(args: Mapping[str, Any]) -> Any:
    """The builder of ``import_path: modula.serving.app:build_app``: ``args = {config: {...}}``
    (the whole config as data, secrets removed). API keys come from ``$MODULA_API_KEYS`` (read
    here and again by every ingress replica) and ``serve.api_keys`` if the config has them."""
    if not isinstance(args, Mapping) or not isinstance(args.get("config"), Mapping):
        raise ValueError("modula.serving.app:build_app needs args: {config: <the modula config "
                         "as a mapping>} (see `modula render --target serve`)")
    cfg = _config(args["config"])
    return build_graph(cfg, api_key_hashes=env_key_hashes(), config_data=replica_config(cfg))
