"""What a serving replica loads: the base model and tokenizer from ``model.base`` and the experts
of the latest registry version, wrapped for the engine.

Serving reads only artifacts and the config (docs/architecture.md): the base model through
:mod:`modula.basemodel` (built-in, a local HF directory or an ``s3://`` prefix), the experts
through :class:`modula.infra.registry.Registry` (every file's sha256 checked) and
:func:`modula.model.load_modula` (the manifest, shapes and base fingerprint checked).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modula.basemodel import BaseModelMissing, load_base_model, load_base_tokenizer
from modula.config.schema import ModulaConfig
from modula.errors import ModulaError
from modula.infra.layout import cache_dir, registry_model_name
from modula.infra.registry import Registry
from modula.model import load_modula
from modula.serving import topology
from modula.serving.engine import ModelAdapter, modula_adapter

__all__ = [
    "ModelSource",
    "ModelUnavailable",
    "RoutingModel",
    "configure_torch",
    "replica_threads",
    "load_tokenizer",
    "modula_adapter",
    "replica_placement",
]

log = logging.getLogger(__name__)


class ModelUnavailable(ModulaError, RuntimeError):
    """There is nothing to serve yet (no base model, or no published version)."""


def replica_threads(cfg: ModulaConfig) -> int:
    """torch intra-op threads of a model replica: ``serve.threads``, else its CPUs."""
    return cfg.serve.threads or max(1, round(cfg.serve.resources.num_cpus))


def configure_torch(cfg: ModulaConfig) -> None:
    """A model replica's torch threads, explicit (Ray's OMP default can be 1 thread or all
    cores): intra-op ``serve.threads`` (default: the replica's CPUs), inter-op
    ``serve.interop_threads`` when set (only before the process's first parallel work; a
    replica that cannot change it any more keeps torch's and says so)."""
    torch.set_num_threads(replica_threads(cfg))
    interop = cfg.serve.interop_threads
    if interop is not None and torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError as exc:
            log.warning("serve.interop_threads=%d not applied (%s); torch keeps %d", interop,
                        exc, torch.get_num_interop_threads())


def replica_placement(cfg: ModulaConfig, on_gpu: bool | None = None) -> tuple[str, torch.dtype]:
    """Where a replica runs its model and in which dtype. An expert replica with a GPU
    (``serve.resources.num_gpus > 0``) runs on ``cuda`` in ``serve.dtype`` (``auto``:
    bfloat16), where ``modula.kernel: auto`` picks the Triton kernels; a CPU replica in
    ``serve.dtype`` (``auto``: ``model.dtype``). ``on_gpu=False``: a replica without a GPU
    whatever the config says (the Router)."""
    s = cfg.serve
    gpu = s.on_gpu if on_gpu is None else on_gpu
    if s.dtype != "auto":
        dtype = s.dtype
    else:
        dtype = "bfloat16" if gpu else cfg.model.dtype
    return ("cuda" if gpu else "cpu"), getattr(torch, dtype)


def _place(model: Any, device: str, dtype: torch.dtype) -> None:
    """Move ``model`` to ``device`` and its floating parameters to ``dtype``; buffers keep
    their dtype (rotary frequencies stay float32, as Hugging Face loads them)."""
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def load_tokenizer(cfg: ModulaConfig) -> Any:
    """The base model's tokenizer (the ingress tokenises; the experts detokenise)."""
    try:
        return load_base_tokenizer(cfg)
    except BaseModelMissing as exc:
        raise ModelUnavailable(str(exc)) from None


class ModelSource:
    """Loads what one replica serves: base + (a group of) experts of a registry version.

    `group`: the domains of this expert deployment (None: all of them). `extra_domains`: also
    serve the registry's domains that no configured group names (domains added after
    deployment, e.g. by ``modula add-domain``); set on the last group.
    """

    def __init__(self, cfg: ModulaConfig, group: Sequence[str] | None = None,
                 extra_domains: bool = True, on_gpu: bool | None = None):
        self.cfg = cfg
        self.device, self.dtype = replica_placement(cfg, on_gpu)
        self.group = list(group) if group is not None else None
        self.extra_domains = extra_domains
        self.base_only = cfg.serve.base_only
        self.model_name = registry_model_name(cfg)
        self._registry: Any = None
        self._cache_root = cache_dir("serving", str(os.getpid()))
        self._fetched: list[Path] = []
        self._lock = threading.Lock()

    @property
    def polls(self) -> bool:
        """Whether replicas should poll the registry for new versions."""
        return not self.base_only

    @property
    def registry(self) -> Any:
        if self._registry is None:
            self._registry = Registry.from_config(self.cfg)
        return self._registry

    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg)

    def latest_version(self) -> int | None:
        if self.base_only:
            return None
        return self.registry.latest_version(self.model_name)

    def _keep(self, domains: Sequence[str]) -> list[str]:
        if self.group is None:
            return list(domains)
        grouped = {d for g in topology.expert_groups(self.cfg) for d in g}
        return [d for d in domains if d in self.group
                or (self.extra_domains and d not in grouped)]

    def load(self, version: int | None) -> ModelAdapter:
        """The base model with the experts of `version` (the base alone with ``base_only``)."""
        with self._lock:
            if self.device == "cuda" and not torch.cuda.is_available():
                raise ModelUnavailable(
                    "serve.resources.num_gpus > 0, but this replica sees no CUDA device "
                    "(torch.cuda.is_available() is false)")
            try:
                # in model.dtype: the base the experts were published against (fingerprint)
                base, _ = load_base_model(self.cfg)
            except BaseModelMissing as exc:
                raise ModelUnavailable(str(exc)) from None
            base.requires_grad_(False)
            if self.base_only:
                _place(base, self.device, self.dtype)
                return ModelAdapter(base, version=None,
                                    info={"base_model": self.cfg.model.base, "adapters": False})
            if version is None:
                raise ModelUnavailable(
                    f"the registry in {self.cfg.storage.root} has no published version of model "
                    f"{self.model_name!r}: train and publish it first (or set serve.base_only)")
            t0 = time.perf_counter()
            dest = self._cache_root / self.model_name / f"v{version}"
            local = self.registry.fetch(self.model_name, version, dest)
            model = load_modula(base, local.path, adapter_dtype=self.dtype)
            _place(model, self.device, self.dtype)
            if self.cfg.modula.kernel != "auto":
                model.kernel_backend = self.cfg.modula.kernel
            for d in list(model.domains):
                if d not in self._keep(model.domains):
                    model.remove_domain(d)
            self._forget_old(dest)
            log.info("loaded %s v%s (%s, domains %s) in %.1fs", self.model_name, version,
                     model.variant, model.domains, time.perf_counter() - t0)
            mv = local.manifest
            router = self.cfg.modula.router
            return modula_adapter(model, version=version, info={
                "base_model": mv.base_model.id if mv.base_model else self.cfg.model.base,
                "registry_model": self.model_name,
            }, granularity=router.granularity, request_top_k=router.request_top_k,
                compile=self.cfg.serve.compile)

    def cleanup(self) -> None:
        """Delete this replica's fetched copies (the models are in memory)."""
        shutil.rmtree(self._cache_root, ignore_errors=True)

    def _forget_old(self, keep: Path) -> None:
        """Delete this replica's copies of older versions (keep the previous one: it may be
        draining; its files are loaded into memory already anyway)."""
        if keep not in self._fetched:
            self._fetched.append(keep)
        while len(self._fetched) > 2:
            shutil.rmtree(self._fetched.pop(0), ignore_errors=True)


class RoutingModel:
    """The full model (every domain), used by the Router to send a request to the expert group
    with the most gate mass for its prompt: one batched prompt forward, no generation."""

    def __init__(self, cfg: ModulaConfig):
        self.cfg = cfg
        self.source = ModelSource(cfg, on_gpu=False)  # the Router's replicas hold no GPU
        self.adapter = self.source.load(self.source.latest_version())
        self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._checked < self.cfg.serve.registry_poll_s:
            return
        self._checked = time.monotonic()
        try:
            latest = self.source.latest_version()
            if latest is not None and latest != self.adapter.version:
                self.adapter = self.source.load(latest)
        except Exception:  # noqa: BLE001 - keep routing with the current version
            log.exception("router: cannot load the latest registry version")

    def gates(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Per prompt, the mean gate of each domain over its tokens and the layers (with
        request-level routing: the classifier's probability of each domain)."""
        self._maybe_reload()
        a = self.adapter
        if not a.domains or a.gate_names is None:
            return [{} for _ in prompts]
        n, length = len(prompts), max(len(p) for p in prompts)
        pad = 0
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, length - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        if a.classify is not None:  # request-level routing: the classifier's probabilities
            with torch.inference_mode():
                probs, _ = a.classify(ids, mask)
            return [{c: float(p) for c, p in zip(a.request_classes, row, strict=True)
                     if c in a.domains} for row in probs.tolist()]
        with torch.inference_mode():
            _, gates = a.forward(ids, mask, pos, a.new_cache(), [-1] * n, True)
        if gates is None:
            return [{} for _ in prompts]
        g = (gates.float() * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        out = []
        for row in g.tolist():
            out.append({name: float(w) for name, w in zip(a.gate_names, row, strict=False)
                        if name in a.domains})
        return out
