"""The MoDULA model: universal + domain LoRA experts and per-layer routers on any HF causal LM.

- ``attach_modula`` / ``ModulaModel``: wrap a model, switch stages, add/remove/force domains,
  read gates;
- expert files: ``save_experts`` / ``load_experts`` / ``load_modula`` (+ one expert:
  ``save_expert`` / ``load_expert``), ``base_model_fingerprint``, ``ExpertFileError``;
- ``export_peft`` / ``import_peft``; ``merge_into_base``.
"""

from .files import (
    ExpertFileError,
    base_model_fingerprint,
    load_expert,
    load_experts,
    load_modula,
    read_manifest,
    save_expert,
    save_experts,
)
from .layer import ModulaLinear
from .merge import merge_into_base
from .model import (
    STAGES,
    ModulaModel,
    attach_modula,
    enable_activation_checkpointing,
    mean_gate_per_expert,
)
from .peft_interop import export_peft, import_peft
from .request_router import RequestRouter, request_gate_weights
from .targets import DEFAULT_TARGETS, default_targets

__all__ = [
    "DEFAULT_TARGETS",
    "STAGES",
    "ExpertFileError",
    "ModulaLinear",
    "ModulaModel",
    "RequestRouter",
    "attach_modula",
    "base_model_fingerprint",
    "default_targets",
    "enable_activation_checkpointing",
    "export_peft",
    "import_peft",
    "load_expert",
    "load_experts",
    "load_modula",
    "mean_gate_per_expert",
    "merge_into_base",
    "read_manifest",
    "request_gate_weights",
    "save_expert",
    "save_experts",
]
