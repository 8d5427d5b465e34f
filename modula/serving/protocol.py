"""The OpenAI-compatible wire format: requests, validation, errors, responses, stream chunks.

Ray-free and torch-free. Every problem with a request becomes an :class:`APIError` with an HTTP
status in the 4xx range and an OpenAI-style body (``{"error": {"message", "type", "param",
"code"}}``); the ingress never answers bad input with a 500.

Model names: ``<served name>`` lets the per-token routers mix the experts; ``<served
name>:<domain>`` pins one domain expert (``force_domain``). The response carries, in the
extension field ``modula``, the mean gate weight of each expert over the request's tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "GenerationResult",
    "Limits",
    "SamplingParams",
    "StreamOptions",
    "check_api_key",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "hash_api_key",
    "model_list",
    "parse_json_body",
    "parse_model_name",
    "parse_request",
    "sse",
]

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


# ------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """A request the service refuses, with its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type or _default_type(self.status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def __reduce__(self):  # keep status/param/code across Ray's pickling
        return (_rebuild_api_error, (self.status, self.message, self.type, self.param, self.code))

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def _rebuild_api_error(status: int, message: str, type: str, param: str | None,
                       code: str | None) -> APIError:
    return APIError(status, message, type=type, param=param, code=code)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    if status == 503:
        return "service_unavailable"
    return "server_error"


def _pydantic_error(exc: ValidationError, prefix: str = "") -> APIError:
    """The first problem of a pydantic validation, as a 400 naming the field."""
    errs = exc.errors(include_url=False)
    err = errs[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    kind = err["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}",
                        param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    got = err.get("input")
    shown = type(got).__name__ if isinstance(got, (dict, list)) else repr(got)
    code = "invalid_type" if kind.endswith("_type") or kind in (
        "model_type", "dict_type", "list_type", "string_type", "int_type", "float_type",
        "bool_type") else "invalid_value"
    more = f" ({len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return APIError(400, f"Invalid value for '{param}': {msg} (got {shown}).{more}",
                    param=param, code=code)


# ------------------------------------------------------------------------------------ keys


def hash_api_key(key: str) -> str:
    """The sha256 hex of a key: deployments receive hashes, never the keys themselves."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key(authorization: str | None, key_hashes: Iterable[str]) -> None:
    """Raise a 401 unless `authorization` is ``Bearer <one of the keys>`` (no keys: open)."""
    hashes = [h for h in key_hashes if h]
    if not hashes:
        return
    if not authorization:
        raise APIError(401, "You didn't provide an API key. Provide it in the Authorization "
                            "header as 'Bearer YOUR_KEY'.", code="invalid_api_key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Malformed Authorization header: expected 'Bearer YOUR_KEY'.",
                       code="invalid_api_key")
    got = hash_api_key(token)
    ok = False
    for h in hashes:  # compare against every key: timing does not tell which one matched
        ok |= hmac.compare_digest(got, h)
    if not ok:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ------------------------------------------------------------------------------------ requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Strict):
    """The generation parameters common to both endpoints."""

    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for s in items:
            if not s:
                raise ValueError("a stop sequence must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop sequence must be at most {MAX_STOP_LENGTH} characters")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not (-(2**63) <= v < 2**64):
            raise ValueError("seed must fit in 64 bits")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


def parse_json_body(raw: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (413 when too large)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise APIError(413, f"Request body is {len(raw)} bytes; the limit is {max_bytes}.",
                       code="request_too_large")
    if not raw.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.",
                       code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.",
                       code="invalid_json")
    return data


def parse_request(kind: Literal["completion", "chat"], data: Mapping[str, Any]):
    """Validate a JSON body into a request model (400 naming the field on any problem)."""
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = cls.model_validate(dict(data))
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise APIError(400, f"Only n=1 is supported (got n={req.n}).", param="n",
                       code="unsupported_value")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias",
                       code="unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported.", param="echo", code="unsupported_value")
        if req.logprobs is not None:
            raise APIError(400, "logprobs is not supported.", param="logprobs",
                           code="unsupported_parameter")
        if req.best_of not in (None, 1):
            raise APIError(400, "Only best_of=1 is supported.", param="best_of",
                           code="unsupported_value")
        if req.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix",
                           code="unsupported_parameter")
    else:
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "logprobs is not supported.", param="logprobs",
                           code="unsupported_parameter")
        if req.tools or req.tool_choice not in (None, "none"):
            raise APIError(400, "Tool calling is not supported by this model.", param="tools",
                           code="unsupported_parameter")
        if req.response_format not in (None, {"type": "text"}):
            raise APIError(400, "Only response_format {'type': 'text'} is supported.",
                           param="response_format", code="unsupported_value")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one.",
                           param="max_completion_tokens", code="invalid_value")


def parse_model_name(model: str, served_name: str) -> str | None:
    """The pinned domain of ``<served>:<domain>``, None for ``<served>``; 404 otherwise."""
    name, sep, domain = model.partition(":")
    if name != served_name:
        raise APIError(404, f"The model '{model}' does not exist (this service serves "
                            f"'{served_name}' and '{served_name}:<domain>').",
                       param="model", code="model_not_found")
    if sep and not domain:
        raise APIError(404, f"The model '{model}' does not exist: no domain after ':'.",
                       param="model", code="model_not_found")
    return domain or None


def unknown_domain(model: str, domain: str, known: Sequence[str]) -> APIError:
    return APIError(404, f"The model '{model}' does not exist: no domain expert '{domain}' "
                         f"(domains: {', '.join(known) or 'none'}).",
                    param="model", code="model_not_found")


@dataclass(frozen=True)
class Limits:
    """What the config allows a request to ask for."""

    max_prompt_tokens: int
    max_tokens_limit: int
    default_completion_tokens: int = 16


def resolve_max_tokens(req: _Sampling, limits: Limits) -> int:
    """The number of new tokens to generate, checked against the configured range (400)."""
    asked = req.max_tokens
    param = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        asked, param = req.max_completion_tokens, "max_completion_tokens"
    if asked is None:
        default = (min(limits.default_completion_tokens, limits.max_tokens_limit)
                   if isinstance(req, CompletionRequest) else limits.max_tokens_limit)
        return default
    if not 1 <= asked <= limits.max_tokens_limit:
        raise APIError(400, f"{param} must be between 1 and {limits.max_tokens_limit} "
                            f"(got {asked}).", param=param, code="invalid_value")
    return asked


def check_prompt_length(n_tokens: int, limits: Limits, param: str) -> None:
    if n_tokens == 0:
        raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
    if n_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"This model's maximum prompt length is {limits.max_prompt_tokens} "
                            f"tokens; your prompt has {n_tokens} tokens. Shorten it.",
                       param=param, code="context_length_exceeded")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    if all(isinstance(x, int) for x in p):
        return list(p)  # type: ignore[arg-type]
    if len(p) != 1:
        raise APIError(400, f"Only one prompt per request is supported (got {len(p)}).",
                       param="prompt", code="unsupported_value")
    return p[0]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ internal


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop (picklable; passed to the expert replicas)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    @classmethod
    def from_request(cls, req: _Sampling, max_tokens: int) -> SamplingParams:
        return cls(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(req.stop_list()),
            seed=req.seed,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the router and the expert replicas see it: token ids, not text."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    domain: str | None = None  # None: the per-token routers mix the experts
    model: str = ""  # the model name the client asked for (echoed back)
    arrival: float = field(default_factory=time.time)


@dataclass
class GenerationResult:
    """A finished generation (also the last item of a stream, with `text` the last delta)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    gates: dict[str, float] | None = None
    domain: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def extension(self) -> dict[str, Any]:
        """The ``modula`` field of a response: where the prompt went."""
        out: dict[str, Any] = {"domain": self.domain, "gates": self.gates}
        out.update(self.info)
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------ responses


def completion_response(rid: str, model: str, created: int, res: GenerationResult) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": res.text, "finish_reason": res.finish_reason,
                     "logprobs": None}],
        "usage": res.usage(),
        "modula": res.extension(),
    }


def chat_response(rid: str, model: str, created: int, res: GenerationResult) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": res.text},
                     "finish_reason": res.finish_reason, "logprobs": None}],
        "usage": res.usage(),
        "modula": res.extension(),
    }


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, *, usage: dict[str, int] | None = None,
                     extension: dict[str, Any] | None = None,
                     usage_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model}
    out["choices"] = [] if usage_only else [
        {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    if usage is not None or usage_only:
        out["usage"] = usage
    if extension is not None:
        out["modula"] = extension
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, *, usage: dict[str, int] | None = None,
               extension: dict[str, Any] | None = None,
               usage_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model}
    out["choices"] = [] if usage_only else [
        {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if usage is not None or usage_only:
        out["usage"] = usage
    if extension is not None:
        out["modula"] = extension
    return out


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def model_list(served_name: str, domains: Sequence[str], created: int,
               info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``GET /v1/models``: the mixed model, then one entry per pinned domain."""
    entries = [{"id": served_name, "object": "model", "created": created, "owned_by": "modula",
                "modula": {"domain": None, "domains": list(domains), **(info or {})}}]
    for d in domains:
        entries.append({"id": f"{served_name}:{d}", "object": "model", "created": created,
                        "owned_by": "modula", "modula": {"domain": d}})
    return {"object": "list", "data": entries}
