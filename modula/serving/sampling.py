"""Picking the next token of every row of a batch: greedy or temperature / top-p sampling with
presence and frequency penalties, each row with its own random stream (a seeded request gives
the same tokens whatever else shares its batch)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from modula.serving.protocol import SamplingParams

__all__ = ["make_generator", "sample_next"]


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed if seed is not None else secrets.randbits(63)) % (2**64))
    return g


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                histories: Sequence[Sequence[int]]) -> list[int]:
    """One token per row of `logits` (B, V).

    `histories[i]`: the tokens row i generated so far (for the penalties, as OpenAI applies
    them: to generated tokens only). Rows with temperature 0 take the arg-max.
    """
    logits = logits.float()
    b, v = logits.shape
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if (p.presence_penalty or p.frequency_penalty) and histories[i]:
                hist = torch.tensor(histories[i], dtype=torch.long)
                counts = torch.bincount(hist[hist < v], minlength=v).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    out = torch.argmax(logits, dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return out
    idx = torch.tensor(sampled, dtype=torch.long)
    temps = torch.tensor([params[i].temperature for i in sampled], dtype=logits.dtype)
    probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled], dtype=logits.dtype)
    if bool((top_p < 1.0).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above
        drop = before >= top_p[:, None]
        drop[:, 0] = False  # always keep the most likely token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    for j, i in enumerate(sampled):
        g = generators[i]
        out[i] = int(torch.multinomial(probs[j], 1, generator=g).item())
    return out
