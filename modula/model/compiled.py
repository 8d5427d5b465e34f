"""The compiled decode step (``serve.compile: decode``): ``torch.compile`` of a prepared model's
forward for one new token per row, with eager as the fallback.

Why the decode step and not each fused group's mixture alone: a compiled function costs a
fixed overhead per call (guards, the AOT and inductor wrappers) that, on CPU, came out larger
than the small ops of one group cost eager, and a decoder pays it for 4 groups per layer.
Compiled whole, a decode step pays it once, and inductor fuses the small ops of the base model
(norms, rotary, activations) as well as the mixture's (gates, LeakyReLU, RMS).

What is compiled: the Hugging Face model's forward (attention, the KV cache update, the fused
MoDULA groups of :mod:`modula.model.inference`), as one graph (``fullgraph``: a step runs
compiled or eager, never half of each), with dynamic shapes, since the rows and the KV length
change from step to step. Only decode steps take it (one token per row, inference, the fused
path, no gate capture); a prefill, a captured step or a training forward runs eager. The
per-row routing of the step (pins, fixed weights, masks) is derived before the graph runs, as
one :class:`~modula.model.inference.RoutingPlan` the traced layers read: which routing inputs
a batch has selects a graph, their values are its inputs.

Fallback: if compiling or running the compiled step fails (no C++ compiler, an op or a
construct the compiler does not support), one warning is logged, that step runs eager, and so
does every later one: a request never fails because of compile. Recompiles are bounded: a
step that would build graph :data:`RECOMPILE_LIMIT` + 1 fails the same way (eager from then).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx.experimental._config
from torch import Tensor

from .inference import routing_plan

__all__ = ["COMPILE_TARGETS", "RECOMPILE_LIMIT", "CompiledDecode"]

log = logging.getLogger(__name__)

# serve.compile's values (modula.config.schema.ServeConfig.compile)
COMPILE_TARGETS = ("none", "decode")

# graphs a compiled step may build: one per structure of the routing inputs (routed, pinned,
# fixed, masked, and mixes of them), each for one row and for several (torch specialises a
# size of 1); enough for every mix, few enough that shapes that keep changing stop costing
# compile time (then decode runs eager)
RECOMPILE_LIMIT = 32


class CompiledDecode:
    """A prepared model's decode step, compiled on first use; eager once it has failed.

    ``compiled_calls``: steps that ran compiled (tests, benchmarks); ``failure``: why the
    compiled step was given up (None while it holds)."""

    def __init__(self, model: Any):  # a ModulaModel (model.py imports this module)
        self._model = model
        self._fn: Any = None
        self.failure: str | None = None
        self.compiled_calls = 0
        try:
            self._fn = torch.compile(model.base_model, dynamic=True, fullgraph=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a Python torch.compile does not support
            self._give_up(exc)

    @property
    def active(self) -> bool:
        return self._fn is not None

    def applies(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """This forward is a decode step the compiled graph may run (else eager): one token
        per row, no gradient, the fused path (eval, kernel ``auto``/``stacked``, the routed
        stage path, adapters on) and no gate capture or collection."""
        if self._fn is None:
            return False
        model, st = self._model, self._model._state
        ids = kwargs.get("input_ids", args[0] if args else None)
        return (isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] == 1
                and kwargs.get("inputs_embeds") is None and not torch.is_grad_enabled()
                and model.inference_prepared and not model.base_model.training
                and st.capture is None and st.collect is None and not st.disabled
                and st.path == "routed" and st.backend in ("auto", "stacked"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward for this step: compiled, or eager when that fails."""
        model, st = self._model, self._model._state
        ids = kwargs.get("input_ids", args[0] if args else None)
        st.step_plan = self._plan(ids.shape[0])
        try:
            # no duck shapes: torch would give the rows the symbol of any weight dimension of
            # the same size (3 members, rank 8, ...) and then specialise the graph to it
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                out = self._fn(*args, **kwargs)
            self.compiled_calls += 1
            return out
        except Exception as exc:  # noqa: BLE001 - whatever failed, the step runs eager
            # one graph (fullgraph): its side effects (the KV cache) apply after it ran, so a
            # step that failed changed nothing and runs again eager
            self._give_up(exc)
        finally:
            st.step_plan = None
            for group in model._prepared:
                group._stash = None
        return model.base_model(*args, **kwargs)

    def _plan(self, rows: int) -> Any:
        """The routing plan of a step of ``rows`` rows (every fused layer's input has them),
        from the first group with gated experts (None: no group has any)."""
        for group in self._model._prepared:
            f = group.fused
            if f.ranks:
                return routing_plan(group.layers[0], rows, 3, f.W_t.device, f.dtype)
        return None

    def _give_up(self, exc: BaseException) -> None:
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        if self.failure is None:
            log.warning("the compiled decode step failed (%s); decode runs eager from now on "
                        "(serve.compile: none turns compiling off)", reason)
        self.failure = reason
        self._fn = None
