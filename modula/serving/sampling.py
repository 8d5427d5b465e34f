"""Picking the next token of every row of a batch: greedy or temperature sampling with OpenAI's
presence / frequency penalties and logit bias and vLLM's extensions (``top_k``, ``min_p``,
``repetition_penalty``, tokens banned until ``min_tokens``), each row with its own random
stream (a seeded request gives the same tokens whatever else shares its batch).

Order, as vLLM applies them: logit bias, banned tokens, penalties, then (sampled rows)
temperature, top-k, top-p, min-p. Log probabilities are reported from the raw logits, before
any of these (docs/serving.md)."""

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


def _adjust(logits: torch.Tensor, params: Sequence[SamplingParams],
            histories: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]] | None,
            banned: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Bias, bans and penalties, row by row (only rows that ask pay for them)."""
    v = logits.shape[1]
    out = logits
    for i, p in enumerate(params):
        ban = banned[i] if banned is not None else ()
        touch = (p.logit_bias or ban or p.presence_penalty or p.frequency_penalty
                 or p.repetition_penalty != 1.0)
        if not touch:
            continue
        if out is logits:
            out = logits.clone()
        row = out[i]
        for tok, bias in p.logit_bias:
            if 0 <= tok < v:
                row[tok] += bias
        if ban:
            idx = torch.tensor([t for t in ban if 0 <= t < v], dtype=torch.long)
            row[idx] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = set(histories[i]) | (set(prompts[i]) if prompts is not None else set())
            idx = torch.tensor(sorted(t for t in seen if 0 <= t < v), dtype=torch.long)
            if idx.numel():
                vals = row[idx]
                row[idx] = torch.where(vals > 0, vals / p.repetition_penalty,
                                       vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and histories[i]:
            hist = torch.tensor(histories[i], dtype=torch.long)
            counts = torch.bincount(hist[hist < v], minlength=v).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                histories: Sequence[Sequence[int]],
                prompts: Sequence[Sequence[int]] | None = None,
                banned: Sequence[Sequence[int]] | None = None) -> list[int]:
    """One token per row of `logits` (B, V).

    `histories[i]`: the tokens row i generated so far (presence and frequency penalties apply
    to these, as OpenAI's); `prompts[i]`: its prompt (the repetition penalty covers prompt and
    generated tokens, as vLLM's); `banned[i]`: tokens row i may not pick now (eos and stop
    token ids before ``min_tokens``). Rows with temperature 0 take the arg-max.
    """
    logits = _adjust(logits.float(), params, histories, prompts, banned)
    out = torch.argmax(logits, dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return out
    idx = torch.tensor(sampled, dtype=torch.long)
    temps = torch.tensor([params[i].temperature for i in sampled], dtype=logits.dtype)
    scaled = logits[idx] / temps[:, None]
    ks = [params[i].top_k for i in sampled]
    if any(0 < k < scaled.shape[1] for k in ks):
        for j, k in enumerate(ks):
            if 0 < k < scaled.shape[1]:
                kth = torch.topk(scaled[j], k).values[-1]
                scaled[j] = scaled[j].masked_fill(scaled[j] < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled], dtype=logits.dtype)
    if bool((top_p < 1.0).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above
        drop = before >= top_p[:, None]
        drop[:, 0] = False  # always keep the most likely token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    min_p = torch.tensor([params[i].min_p for i in sampled], dtype=logits.dtype)
    if bool((min_p > 0).any()):
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    for j, i in enumerate(sampled):
        g = generators[i]
        out[i] = int(torch.multinomial(probs[j], 1, generator=g).item())
    return out
