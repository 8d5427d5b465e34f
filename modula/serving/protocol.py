"""The OpenAI-compatible wire format: requests, validation, errors, responses, stream chunks.

Ray-free and torch-free. Every problem with a request becomes an :class:`APIError` with an HTTP
status in the 4xx range and an OpenAI-style body (``{"error": {"message", "type", "param",
"code"}}``); the ingress never answers bad input with a 500.

Model names: ``<served name>`` lets the per-token routers mix the experts; ``<served
name>:<domain>`` pins one domain expert (``force_domain``). A request's own ``modula`` field
restricts the routing to some experts or fixes their weights (:class:`RoutingExtension`). The
response carries, in the extension field ``modula``, the mean gate weight of each expert over
the request's tokens and the routing used. The fields and limits are in docs/serving.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerationRequest",
    "GenerationResult",
    "Limits",
    "Routing",
    "RoutingExtension",
    "SamplingParams",
    "StreamOptions",
    "TokenLogprob",
    "TokenizeRequest",
    "chat_choice",
    "chat_chunk",
    "chat_response",
    "check_api_key",
    "check_limits",
    "check_prompt_length",
    "completion_choice",
    "completion_chunk",
    "completion_prompt",
    "completion_prompts",
    "completion_response",
    "hash_api_key",
    "model_list",
    "new_id",
    "parse_json_body",
    "parse_model_name",
    "parse_request",
    "resolve_max_tokens",
    "routing_extension",
    "sse",
    "total_usage",
    "unknown_domain",
]

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


class ContentPart(BaseModel):
    """One part of a message's content. Only text parts are served; other keys of a part are
    ignored, as are extra keys on a message (evaluation tools send some, e.g. ``type``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"part {i}: only text content parts are supported (got "
                                     f"{'type ' + repr(kind) if kind else type(part).__name__})")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: a text part needs 'text', a string")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class RoutingExtension(_Strict):
    """The request's ``modula`` field: per-request expert weights.

    ``domains``: the learned routers decide per token, but only among these experts
    (renormalised softmax); ``weights``: a fixed mix of experts for every token (normalised to
    sum 1), the routers are not consulted. Names are gate columns: the domain experts, and for
    MoDULA-Flan also ``universal``."""

    domains: list[str] | None = None
    weights: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> RoutingExtension:
        if self.domains is None and self.weights is None:
            raise ValueError("give 'domains' (restrict the routing) or 'weights' (fix the mix)")
        if self.domains is not None and self.weights is not None:
            raise ValueError("give 'domains' or 'weights', not both")
        return self


class _Sampling(_Strict):
    """The generation parameters common to both endpoints (OpenAI's, then vLLM's extensions,
    then modula's)."""

    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # vLLM's sampling extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # modula's: per-request expert weights
    modula: RoutingExtension | None = None

    _ignored: list[str] = PrivateAttr(default_factory=list)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
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

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids (got {k!r})")
        return v

    @property
    def ignored_fields(self) -> list[str]:
        """Top-level fields of the body that the service does not know and ignored."""
        return list(self._ignored)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token, or None for no log probabilities."""
        raise NotImplementedError


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's shape): a prompt, or chat messages rendered by the chat
    template. ``model`` is optional (evaluation tools send none)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give 'prompt' or 'messages' (one of them)")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


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


_KINDS: dict[str, type[BaseModel]] = {"completion": CompletionRequest,
                                      "chat": ChatCompletionRequest,
                                      "tokenize": TokenizeRequest,
                                      "detokenize": DetokenizeRequest}


def parse_request(kind: Literal["completion", "chat", "tokenize", "detokenize"],
                  data: Mapping[str, Any], unknown: Literal["ignore", "refuse"] = "refuse"):
    """Validate a JSON body into a request model (400 naming the field on any problem).

    `unknown`: what a top-level field the model does not define gets: ``refuse`` (a 400, as
    the official API) or ``ignore`` (dropped, as vLLM; listed in ``req.ignored_fields``)."""
    cls = _KINDS[kind]
    body = dict(data)
    ignored = [k for k in body if k not in cls.model_fields]
    if ignored and unknown == "ignore":
        for k in ignored:
            del body[k]
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    if isinstance(req, _Sampling):
        _refuse_unsupported(req)
        if ignored and unknown == "ignore":
            req._ignored = ignored
    return req


def _refuse_unsupported(req: _Sampling) -> None:
    if req.stop_token_ids and any(t < 0 for t in req.stop_token_ids):
        raise APIError(400, "stop_token_ids must be token ids (>= 0).", param="stop_token_ids",
                       code="invalid_value")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, req.n or 1):
            raise APIError(400, "best_of must equal n (no extra candidates are generated).",
                           param="best_of", code="unsupported_value")
        if req.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix",
                           code="unsupported_parameter")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs",
                           code="invalid_value")
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


def check_limits(req: _Sampling, limits: Limits) -> None:
    """What the config allows one request to ask for (400 naming the field)."""
    if (req.n or 1) > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n} (got {req.n}).", param="n",
                       code="invalid_value")
    k = req.top_logprobs_asked()
    if k is not None and k > limits.max_logprobs:
        param = "logprobs" if isinstance(req, CompletionRequest) else "top_logprobs"
        raise APIError(400, f"{param} must be at most {limits.max_logprobs} (got {k}).",
                       param=param, code="invalid_value")
    stops = req.stop_list()
    if len(stops) > limits.max_stop_sequences:
        raise APIError(400, f"At most {limits.max_stop_sequences} stop sequences are allowed "
                            f"(got {len(stops)}).", param="stop", code="invalid_value")
    if req.stop_token_ids and len(req.stop_token_ids) > limits.max_stop_sequences:
        raise APIError(400, f"At most {limits.max_stop_sequences} stop_token_ids are allowed "
                            f"(got {len(req.stop_token_ids)}).", param="stop_token_ids",
                       code="invalid_value")


def routing_extension(req: _Sampling, pinned: str | None) -> Routing:
    """The routing of a request: a pinned domain (the model name), per-request weights or a
    restriction (the ``modula`` field), or the learned routers. Weights are checked (finite,
    >= 0, not all zero: 400 naming ``modula.weights.<name>``) and normalised to sum 1;
    whether the names exist is for the replica to say (404, as for model names)."""
    ext = req.modula
    if ext is None:
        return Routing(domain=pinned)
    if pinned is not None:
        raise APIError(400, f"The model '{req.model}' pins the domain '{pinned}'; a pinned "
                            "model takes no 'modula' routing field (use the unpinned model).",
                       param="modula", code="invalid_value")
    if ext.domains is not None:
        if not ext.domains:
            raise APIError(400, "modula.domains must name at least one expert.",
                           param="modula.domains", code="invalid_value")
        twice = sorted({d for d in ext.domains if ext.domains.count(d) > 1})
        if twice:
            raise APIError(400, f"modula.domains names {twice} twice.", param="modula.domains",
                           code="invalid_value")
        return Routing(allowed=tuple(ext.domains))
    weights = ext.weights or {}
    if not weights:
        raise APIError(400, "modula.weights must give a weight to at least one expert.",
                       param="modula.weights", code="invalid_value")
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise APIError(400, f"modula.weights.{name} must be a finite number >= 0 (got {w}).",
                           param=f"modula.weights.{name}", code="invalid_value")
    total = sum(weights.values())
    if total <= 0:
        raise APIError(400, "modula.weights are all zero: give some expert a positive weight.",
                       param="modula.weights", code="invalid_value")
    return Routing(weights=tuple((n, w / total) for n, w in weights.items()))


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


def unknown_domain(model: str, domain: str, known: Sequence[str],
                   param: str = "model") -> APIError:
    if param == "model":
        what = f"The model '{model}' does not exist: no domain expert '{domain}'"
    else:
        what = f"The model '{model}' has no expert '{domain}' (named in {param})"
    return APIError(404, f"{what} (domains: {', '.join(known) or 'none'}).",
                    param=param, code="model_not_found")


@dataclass(frozen=True)
class Limits:
    """What the config allows a request to ask for."""

    max_prompt_tokens: int
    max_tokens_limit: int
    default_completion_tokens: int = 16
    max_logprobs: int = 20
    max_n: int = 16
    max_batch_prompts: int = 64
    max_stop_sequences: int = 32

    @classmethod
    def from_config(cls, serve: Any) -> Limits:
        """From the config's ``serve`` section."""
        return cls(max_prompt_tokens=serve.max_prompt_tokens,
                   max_tokens_limit=serve.max_tokens_limit, max_logprobs=serve.max_logprobs,
                   max_n=serve.max_n, max_batch_prompts=serve.max_batch_prompts,
                   max_stop_sequences=serve.max_stop_sequences)


def resolve_max_tokens(req: _Sampling, limits: Limits) -> int:
    """The number of new tokens to generate, checked against the configured range (400).
    ``max_tokens: 0`` is allowed with ``echo`` (score the prompt alone)."""
    asked = req.max_tokens
    param = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        asked, param = req.max_completion_tokens, "max_completion_tokens"
    if asked is None:
        default = (min(limits.default_completion_tokens, limits.max_tokens_limit)
                   if isinstance(req, CompletionRequest) else limits.max_tokens_limit)
        return default
    low = 0 if isinstance(req, CompletionRequest) and req.echo else 1
    if not low <= asked <= limits.max_tokens_limit:
        extra = " (0 only with echo)" if low == 1 and asked == 0 and isinstance(
            req, CompletionRequest) else ""
        raise APIError(400, f"{param} must be between {low} and {limits.max_tokens_limit}"
                            f"{extra} (got {asked}).", param=param, code="invalid_value")
    return asked


def check_prompt_length(n_tokens: int, limits: Limits, param: str) -> None:
    if n_tokens == 0:
        raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
    if n_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"This model's maximum prompt length is {limits.max_prompt_tokens} "
                            f"tokens; your prompt has {n_tokens} tokens. Shorten it.",
                       param=param, code="context_length_exceeded")


def completion_prompts(req: CompletionRequest, limits: Limits | None = None
                       ) -> list[str | list[int]]:
    """The prompts of a completion request, in order: each a string or a list of token ids
    (a list of prompts is a batch: one choice per prompt, or n)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "The prompt list is empty.", param="prompt", code="invalid_value")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    prompts: list[str | list[int]] = [x if isinstance(x, str) else list(x) for x in p]
    if limits is not None and len(prompts) > limits.max_batch_prompts:
        raise APIError(400, f"At most {limits.max_batch_prompts} prompts per request "
                            f"(got {len(prompts)}).", param="prompt", code="invalid_value")
    for i, x in enumerate(prompts):
        if not isinstance(x, str) and not x:
            raise APIError(400, f"Prompt {i} is an empty token list.", param=f"prompt.{i}",
                           code="invalid_value")
    return prompts


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request that has exactly one."""
    prompts = completion_prompts(req)
    if len(prompts) != 1:
        raise APIError(400, f"Expected one prompt (got {len(prompts)}).", param="prompt",
                       code="unsupported_value")
    return prompts[0]


# ------------------------------------------------------------------------------------ internal


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop (picklable; passed to the expert replicas).

    ``logprobs``: alternatives to report per generated token (None: no log probabilities);
    ``prompt_logprobs``: the same for the prompt's tokens (``echo`` with ``logprobs``): the
    prefill then keeps every position's logits for this row."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @classmethod
    def from_request(cls, req: _Sampling, max_tokens: int, *, seed_offset: int = 0
                     ) -> SamplingParams:
        k = req.top_logprobs_asked()
        echo = isinstance(req, CompletionRequest) and bool(req.echo)
        return cls(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(req.stop_list()),
            seed=None if req.seed is None else req.seed + seed_offset,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            ignore_eos=bool(req.ignore_eos),
            top_k=max(0, req.top_k or 0),
            min_p=float(req.min_p or 0.0),
            repetition_penalty=float(req.repetition_penalty or 1.0),
            min_tokens=int(req.min_tokens or 0),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logit_bias=tuple((int(t), float(b)) for t, b in (req.logit_bias or {}).items()),
            logprobs=k,
            prompt_logprobs=k if echo else None,
        )


@dataclass(frozen=True)
class Routing:
    """How the experts of one request are chosen (names, resolved to gate columns by the
    replica that runs it): ``domain`` pins one domain expert; ``weights`` fixes the gates
    (name, weight) for every token; ``allowed`` restricts the learned routing to these
    experts; none of them: the learned routers decide. The ``modula`` request field sets
    weights or allowed; a request-level router may set any of them."""

    domain: str | None = None
    weights: tuple[tuple[str, float], ...] | None = None
    allowed: tuple[str, ...] | None = None

    @property
    def mode(self) -> str:
        if self.domain is not None:
            return "pinned"
        if self.weights is not None:
            return "weights"
        if self.allowed is not None:
            return "domains"
        return "routed"

    def names(self) -> list[str]:
        """The experts this routing names (weights of 0 included)."""
        if self.domain is not None:
            return [self.domain]
        if self.weights is not None:
            return [n for n, _ in self.weights]
        return list(self.allowed or ())

    def report(self) -> dict[str, Any]:
        """What the response's gate report says about it."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.weights is not None:
            out["weights"] = {n: round(w, 6) for n, w in self.weights}
        if self.allowed is not None:
            out["domains"] = list(self.allowed)
        return out


# a token's log probability: (token id, logprob, ((alternative id, logprob), ...) best first)
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the router and the expert replicas see it: token ids, not text."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    domain: str | None = None  # None: the per-token routers mix the experts
    model: str = ""  # the model name the client asked for (echoed back)
    arrival: float = field(default_factory=time.time)
    routing: Routing | None = None  # per-request weights / restriction (domain stays above)

    def route(self) -> Routing:
        """The whole routing of this request (the pinned domain included)."""
        if self.routing is None:
            return Routing(domain=self.domain)
        return self.routing if self.domain is None else Routing(domain=self.domain)


@dataclass
class GenerationResult:
    """A finished generation (also the last item of a stream, with `text` the last delta).

    ``logprobs``: one entry per generated token (an eos or stop token id that ended the
    generation included); ``prompt_logprobs``: one per prompt token (None for the first)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    gates: dict[str, float] | None = None
    domain: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def extension(self) -> dict[str, Any]:
        """The ``modula`` field of a response: where the prompt went."""
        out: dict[str, Any] = {"domain": self.domain, "gates": self.gates}
        out.update(self.info)
        return out


def total_usage(results: Sequence[GenerationResult], prompt_of: Sequence[int] | None = None
                ) -> dict[str, int]:
    """Usage of several choices: completion tokens summed, each prompt counted once
    (`prompt_of[i]`: the prompt index of choice i)."""
    seen: dict[int, int] = {}
    for i, r in enumerate(results):
        seen.setdefault(prompt_of[i] if prompt_of is not None else i, r.prompt_tokens)
    prompt = sum(seen.values())
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------ responses


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None,
                      extension: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "text": text, "finish_reason": finish_reason,
                           "logprobs": logprobs}
    if extension is not None:
        out["modula"] = extension
    return out


def chat_choice(index: int, text: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None,
                extension: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text},
                           "finish_reason": finish_reason, "logprobs": logprobs}
    if extension is not None:
        out["modula"] = extension
    return out


def _response(obj: str, rid: str, model: str, created: int,
              results: Sequence[GenerationResult], choices: list[dict[str, Any]],
              usage: dict[str, int] | None, extension: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage if usage is not None else total_usage(results),
            "modula": extension if extension is not None else results[0].extension()}


def completion_response(rid: str, model: str, created: int,
                        res: GenerationResult | Sequence[GenerationResult], *,
                        choices: list[dict[str, Any]] | None = None,
                        usage: dict[str, int] | None = None,
                        extension: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completions response: one choice per result unless `choices` are given; `modula`
    is the first result's gate report unless `extension` is given."""
    results = [res] if isinstance(res, GenerationResult) else list(res)
    if choices is None:
        choices = [completion_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
    return _response("text_completion", rid, model, created, results, choices, usage, extension)


def chat_response(rid: str, model: str, created: int,
                  res: GenerationResult | Sequence[GenerationResult], *,
                  choices: list[dict[str, Any]] | None = None,
                  usage: dict[str, int] | None = None,
                  extension: dict[str, Any] | None = None) -> dict[str, Any]:
    results = [res] if isinstance(res, GenerationResult) else list(res)
    if choices is None:
        choices = [chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
    return _response("chat.completion", rid, model, created, results, choices, usage, extension)


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, *, usage: dict[str, int] | None = None,
                     extension: dict[str, Any] | None = None,
                     usage_only: bool = False, index: int = 0,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model}
    out["choices"] = [] if usage_only else [
        {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]
    if usage is not None or usage_only:
        out["usage"] = usage
    if extension is not None:
        out["modula"] = extension
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, *, usage: dict[str, int] | None = None,
               extension: dict[str, Any] | None = None,
               usage_only: bool = False, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model}
    out["choices"] = [] if usage_only else [
        {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
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
