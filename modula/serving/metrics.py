"""Prometheus metrics of the serving graph.

The ingress records every request in a ``prometheus_client`` registry of its own, exposed at
``GET /metrics`` (text format), and mirrors the same series to Ray's metrics system
(``ray.util.metrics``), which every node exports for a cluster-wide Prometheus scrape when
several ingress replicas run. Names:

- ``modula_requests_total{endpoint, status}``, ``modula_request_latency_seconds{endpoint, stream}``
- ``modula_time_to_first_token_seconds{endpoint}``
- ``modula_prompt_tokens_total``, ``modula_completion_tokens_total`` (tokens in and out)
- ``modula_domain_requests_total{domain, mode}``: a pinned request counts for its domain
  (``mode="pinned"``); a routed one for the domain with the most gate mass (``mode="routed"``)
- ``modula_gate_mass_total{expert}``: the sum over requests of each expert's mean gate weight
  (divide by the request count for the average share of each expert)
- ``modula_requests_in_flight``
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "ServingMetrics"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RayMirror:
    """The same series in Ray's metrics system (a no-op outside a Ray worker)."""

    def __init__(self) -> None:
        self.ok = False
        try:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                return
            self.requests = rm.Counter("modula_requests", "Requests by endpoint and status",
                                       tag_keys=("endpoint", "status"))
            self.latency = rm.Histogram("modula_request_latency_seconds", "Request latency",
                                        boundaries=list(LATENCY_BUCKETS),
                                        tag_keys=("endpoint", "stream"))
            self.tokens_in = rm.Counter("modula_prompt_tokens", "Prompt tokens")
            self.tokens_out = rm.Counter("modula_completion_tokens", "Completion tokens")
            self.domain = rm.Counter("modula_domain_requests", "Requests per domain",
                                     tag_keys=("domain", "mode"))
            self.gate = rm.Counter("modula_gate_mass", "Sum of mean gate weight per expert",
                                   tag_keys=("expert",))
            self.ok = True
        except Exception:  # noqa: BLE001 - metrics must never break serving
            log.debug("ray metrics unavailable", exc_info=True)


class ServingMetrics:
    """The ingress's metrics (one registry per instance, so tests can hold several)."""

    def __init__(self, mirror_to_ray: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("modula_requests", "Requests by endpoint and HTTP status",
                                ("endpoint", "status"), registry=r)
        self.latency = Histogram("modula_request_latency_seconds",
                                 "Time from request to the last byte of the answer",
                                 ("endpoint", "stream"), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("modula_time_to_first_token_seconds",
                              "Time from request to the first generated token",
                              ("endpoint",), buckets=TTFT_BUCKETS, registry=r)
        self.tokens_in = Counter("modula_prompt_tokens", "Prompt tokens (tokens in)", registry=r)
        self.tokens_out = Counter("modula_completion_tokens", "Generated tokens (tokens out)",
                                  registry=r)
        self.domain_requests = Counter("modula_domain_requests",
                                       "Requests per domain: pinned, or routed (top gate)",
                                       ("domain", "mode"), registry=r)
        self.gate_mass = Counter("modula_gate_mass",
                                 "Sum over requests of the mean gate weight of each expert",
                                 ("expert",), registry=r)
        self.in_flight = Gauge("modula_requests_in_flight", "Requests being answered",
                               registry=r)
        self._ray = _RayMirror() if mirror_to_ray else None

    def request_done(self, endpoint: str, status: int, seconds: float, stream: bool) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status < 400:
            self.latency.labels(endpoint, str(stream).lower()).observe(seconds)
        if self._ray is not None and self._ray.ok:
            try:
                self._ray.requests.inc(1, {"endpoint": endpoint, "status": str(status)})
                if status < 400:
                    self._ray.latency.observe(seconds, {"endpoint": endpoint,
                                                        "stream": str(stream).lower()})
            except Exception:  # noqa: BLE001
                log.debug("ray metrics failed", exc_info=True)

    def first_token(self, endpoint: str, seconds: float) -> None:
        self.ttft.labels(endpoint).observe(max(0.0, seconds))

    def generation_done(self, prompt_tokens: int, completion_tokens: int, domain: str | None,
                        gates: Mapping[str, float] | None) -> None:
        self.tokens_in.inc(prompt_tokens)
        self.tokens_out.inc(completion_tokens)
        if domain is not None:
            mode, top = "pinned", domain
        elif gates:
            mode, top = "routed", max(gates.items(), key=lambda kv: kv[1])[0]
        else:
            mode, top = "routed", "none"
        self.domain_requests.labels(top, mode).inc()
        for name, w in (gates or {}).items():
            self.gate_mass.labels(name).inc(max(0.0, float(w)))
        m = self._ray
        if m is not None and m.ok:
            try:
                m.tokens_in.inc(prompt_tokens) if prompt_tokens else None
                m.tokens_out.inc(completion_tokens) if completion_tokens else None
                m.domain.inc(1, {"domain": top, "mode": mode})
                for name, w in (gates or {}).items():
                    if w > 0:
                        m.gate.inc(float(w), {"expert": name})
            except Exception:  # noqa: BLE001
                log.debug("ray metrics failed", exc_info=True)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: dict[str, Any] | None = None) -> float | None:
        """One sample's value (for tests and the CLI)."""
        return self.registry.get_sample_value(name, labels or {})
