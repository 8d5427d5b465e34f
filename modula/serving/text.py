"""Incremental detokenisation with stop sequences, one tracker per request.

A tracker turns the token ids a request generates, one at a time, into text deltas that are safe
to send: it never emits half a UTF-8 character (a byte-level token may end inside one) and holds
back a tail that could be the start of a stop sequence, so a client never sees a stop sequence
or a piece of one. The returned text ends before the first stop sequence, as OpenAI's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextTracker"]

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first generated ones (leading-space rules)


class TextTracker:
    """The text of one request's generated tokens, delivered as deltas."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # decoded text of the generated tokens so far (complete characters)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop sequence was found; `text` is cut before it
        self._checking = True  # stop sequences are looked for (min_tokens reached)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int, check_stop: bool = True) -> str:
        """Add one generated token; returns the text that may be sent now ('' if none).
        With `check_stop` False (before ``min_tokens``), stop sequences are not looked for and
        nothing is held back; a later match never reaches into text already sent."""
        if self.stopped:
            return ""
        self._checking = check_stop
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            new = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            before = len(self.text)
            self.text += new
            if self.stop and check_stop:
                self._find_stop(before)
        return self._release()

    def _find_stop(self, before: int) -> None:
        # a match starts at or after the text already sent (what could begin a stop is held)
        start = max(0, before - self._max_stop + 1, self.emitted)
        cut = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True

    def _held(self) -> int:
        """Characters at the end of `text` that could begin a stop sequence."""
        if self.stopped or not self.stop or not self._checking:
            return 0
        tail = self.text[-self._max_stop:] if self._max_stop else ""
        for k in range(min(len(tail), self._max_stop), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _release(self) -> str:
        end = len(self.text) - self._held()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def finish(self) -> str:
        """The generation is over: decode what is still pending (an incomplete character shows
        as U+FFFD, as in any decode) and release what was held back."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            before = len(self.text)
            self.text += full[len(prefix):]
            self._read_offset = len(self._ids)
            if self.stop and self._checking:
                self._find_stop(before)
        if self.emitted >= len(self.text):
            return ""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
