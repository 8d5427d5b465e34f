"""Tiny random HF causal LMs of each supported family, shared by the tests/test_model*.py files.

Nothing is downloaded: every model is built from a config with a fixed seed, so two calls with
the same seed give the same weights (a "reloaded" base model).
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modula.config import ModulaLayerConfig, RouterConfig

VOCAB = 97
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family in ("llama", "qwen2", "mistral"):
        cls_cfg, cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }[family]
        cfg = cls_cfg(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common,
        )
    elif family == "gpt2":
        cls = GPT2LMHeadModel
        cfg = GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )
    elif family == "gpt_neox":
        cls = GPTNeoXForCausalLM
        cfg = GPTNeoXConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **common,
        )
    else:
        raise ValueError(family)
    return cls(cfg).eval()


def layer_config(variant: str = "res", **kw) -> ModulaLayerConfig:
    router = kw.pop("router", None)
    return ModulaLayerConfig(
        variant=variant, universal_rank=kw.pop("universal_rank", 8),
        domain_rank=kw.pop("domain_rank", 4), router=router or RouterConfig(), **kw,
    )


def domains_for(variant: str) -> list[str]:
    return [] if variant == "lora" else ["code", "math"]


def randomise_adapters(model, seed: int = 1, std: float = 0.2) -> None:
    """Give every B a non-zero value (new experts start at B = 0, a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B") or name.endswith(".router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def token_batch(batch: int = 3, seq: int = 7, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
