"""Log probabilities as the OpenAI API shows them: the engine reports token ids and numbers
(:data:`~modula.serving.protocol.TokenLogprob`), the ingress turns them into text here.

A token's text is decoded in context (what the token adds after the few tokens before it, so
leading spaces and multi-byte characters come out as in the whole text), special tokens
included (an eos shows as ``</s>``, not as nothing). ``text_offset`` counts characters of these
token texts from the start of the choice's ``text`` (as vLLM does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modula.serving.protocol import TokenLogprob

__all__ = ["TokenTexts", "chat_logprobs", "completion_logprobs"]

_CONTEXT = 4


class TokenTexts:
    """Decodes token ids to the text they add after their context."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def piece(self, before: Sequence[int], token: int) -> str:
        ctx = list(before[-_CONTEXT:])
        if not ctx:
            return self._decode([token])
        prefix = self._decode(ctx)
        full = self._decode([*ctx, token])
        return full[len(prefix):] if full.startswith(prefix) else self._decode([token])


def completion_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob | None],
                        ids: Sequence[int], before: Sequence[int] = (), offset: int = 0
                        ) -> dict[str, Any]:
    """The ``logprobs`` object of a completion choice (or chunk): `entries[i]` is the report
    of token `ids[i]` (None: no log probability, the prompt's first token); `before`: the
    tokens that precede them; `offset`: the text offset of the first."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    context = list(before)
    for tok, entry in zip(ids, entries, strict=True):
        piece = texts.piece(context, tok)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            _, lp, top = entry
            alts: dict[str, float] = {}
            for t, v in top:  # best first: two ids with one text keep the better value
                alts.setdefault(texts.piece(context, t), v)
            alts.setdefault(piece, lp)  # the chosen token is always there (up to k + 1)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(alts)
        offset += len(piece)
        context.append(tok)
    return out


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob],
                  before: Sequence[int] = ()) -> dict[str, Any]:
    """The ``logprobs`` object of a chat choice (or chunk): ``{"content": [...]}``."""
    content = []
    context = list(before)
    for tok, lp, top in entries:
        piece = texts.piece(context, tok)
        alts = []
        for t, v in top:
            p = texts.piece(context, t)
            alts.append({"token": p, "logprob": v, "bytes": list(p.encode("utf-8"))})
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")),
                        "top_logprobs": alts})
        context.append(tok)
    return {"content": content}
