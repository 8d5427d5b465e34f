"""The mixture-of-LoRA ops of one adapted layer, independent of HF models and of Ray.

``expert_mixture`` is the single entry point; ``backend`` picks ``reference`` (the loop, the
test oracle), ``stacked`` (torch, the CPU default) or ``triton`` (fused kernels, the CUDA
default); ``auto`` chooses by device.
"""

from .mixture import BACKENDS, expert_mixture, resolve_backend, triton_available
from .types import ExpertStack, Residual, stack_experts

__all__ = [
    "BACKENDS",
    "ExpertStack",
    "Residual",
    "expert_mixture",
    "resolve_backend",
    "stack_experts",
    "triton_available",
]
