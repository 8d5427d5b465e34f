"""The base model sizes the serving benchmarks run at, and the adapter FLOP ratio of a model.

Shared by ``benchmarks/serving.py`` (the Serve graph over HTTP) and ``benchmarks/decode_step.py``
(one decode step, in process). Every size is the built-in Llama architecture (``model.tiny``)
with random weights: nothing downloads, and throughput does not depend on the values.
"""

from __future__ import annotations

from typing import Any

SIZES: dict[str, dict[str, int]] = {
    # the built-in model (model.tiny defaults): hidden 192, 4 layers, 2.4 M parameters
    "tiny": {},
    # hidden 512, 6 layers: about 20 M parameters
    "small": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4,
              "intermediate_size": 1408},
    # hidden 1024, 8 layers: about 97 M parameters
    "medium": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 8,
               "intermediate_size": 2816},
}


def tiny_config(size: str) -> Any:
    """The ``TinyModelConfig`` of a size (``model.tiny`` defaults overridden)."""
    from modula.config import TinyModelConfig

    return TinyModelConfig(**{**TinyModelConfig().model_dump(), **SIZES[size]})


class _Vocab:
    """What ``llama_config`` reads from a tokenizer, for a model that never sees text."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def random_base(size: str) -> Any:
    """A randomly initialised built-in-architecture ``LlamaForCausalLM`` of ``size``."""
    from modula.basemodel import build_model

    tiny = tiny_config(size)
    return build_model(tiny, _Vocab(tiny.vocab_size)).eval()


def flop_ratio(model: Any, n_domains: int, universal_rank: int, domain_rank: int,
               lm_head: bool = True) -> dict[str, float]:
    """Multiply-adds per token that MoDULA-Res adds, as the formula is written, over those of
    the base model's linear layers (``lm_head`` included unless told otherwise).

    Per adapted linear (d_in -> d_out): the universal expert ``r* (d_in + d_out)``, each domain
    expert reading the d_out-wide ``h``: ``r (d_out + d_out)``, the router ``n d_in``. Returns
    the ratio over every base linear (``all``) and over the adapted linears only
    (``adapted``)."""
    import torch.nn as nn

    from modula.model import default_targets
    from modula.model.targets import find_targets, linear_dims

    targets = set(find_targets(model, default_targets(model)))
    base_all = base_adapted = adapter = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if not lm_head and name.endswith("lm_head"):
                continue
            d_in, d_out = linear_dims(mod)
            base_all += d_in * d_out
            if name in targets:
                base_adapted += d_in * d_out
                adapter += (universal_rank * (d_in + d_out)
                            + n_domains * domain_rank * 2 * d_out + n_domains * d_in)
    return {"all": adapter / base_all, "adapted": adapter / base_adapted,
            "adapter_macs": adapter, "base_macs": base_all}
