"""Tokenisation, packing and collation.

- :func:`encode_example`: prompt + response in the chat format; the prompt's labels are -100, so
  the loss (and response perplexity) covers the response and its eos only.
- :func:`encode_text`: a pretraining document cut into pieces of at most ``max_length`` tokens.
- :func:`pack`: several examples per fixed-length row. Each example keeps its own positions
  (0, 1, 2, ... restarting at every example), and with no attention mask Hugging Face models
  read restarting ``position_ids`` as packed sequences and attend only within each one
  (``transformers.masking_utils.find_packed_sequence_indices``). Call the model with
  ``use_cache=False`` and no ``attention_mask``.
- :func:`collate`: plain right-padded batches with an attention mask (eval, small jobs).
- :func:`tokenized_dataset`: the same on a Ray Data dataset, for trainers: the output has only
  integer columns (``iter_torch_batches`` cannot take strings).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from modula.data.tokenizer import load_tokenizer, render_prompt, render_response
from modula.infra.layout import scratch_dir

__all__ = [
    "IGNORE_INDEX",
    "ROUTE_TARGETS",
    "encode_example",
    "encode_text",
    "pack",
    "collate",
    "tokenizer_files",
    "tokenizer_from_files",
    "tokenize_batch",
    "tokenized_dataset",
]

IGNORE_INDEX = -100
# per token: the gate column router supervision pulls toward (-100: no target)
ROUTE_TARGETS = "route_targets"


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int,
                   train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Token ids and labels of one record; too long = the prompt's start, then the response's
    end, are cut (the prompt keeps at most half of `max_length`)."""
    p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(render_response(tokenizer, response), add_special_tokens=False)["input_ids"]
    if len(p) + len(r) > max_length:
        keep_p = min(len(p), max(max_length // 2, max_length - len(r)))
        p = p[len(p) - keep_p:]
        r = r[: max_length - len(p)]
    ids = p + r
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + list(r)
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer: Any, text: str, max_length: int, min_tokens: int = 16
                ) -> list[dict[str, list[int]]]:
    """A document as pieces of at most `max_length` tokens, eos after its end; every token is a
    label. Pieces shorter than `min_tokens` (a tail) are dropped."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    out = []
    for i in range(0, len(ids), max_length):
        piece = ids[i: i + max_length]
        if len(piece) >= min_tokens:
            out.append({"input_ids": piece, "labels": list(piece)})
    return out


def pack(examples: list[dict[str, list[int]]], max_length: int, pad_id: int
         ) -> dict[str, np.ndarray]:
    """Greedy in-order packing into rows of `max_length`: ``input_ids``, ``labels`` and
    ``position_ids`` (int64, shape [rows, max_length]), plus ``route_targets`` when the
    examples carry them. Padding has label (and route target) -100 and its own positions, so
    it forms a separate segment no example attends to."""
    extra = [k for k in (ROUTE_TARGETS,) if examples and k in examples[0]]
    keys = ["input_ids", "labels", "position_ids", *extra]
    rows: dict[str, list[list[int]]] = {k: [] for k in keys}
    cur: dict[str, list[int]] = {k: [] for k in keys}

    def flush() -> None:
        if not cur["input_ids"]:
            return
        n = max_length - len(cur["input_ids"])
        rows["input_ids"].append(cur["input_ids"] + [pad_id] * n)
        rows["labels"].append(cur["labels"] + [IGNORE_INDEX] * n)
        rows["position_ids"].append(cur["position_ids"] + list(range(n)))
        for k in extra:
            rows[k].append(cur[k] + [IGNORE_INDEX] * n)

    for ex in examples:
        ids = ex["input_ids"][:max_length]
        if not ids:
            continue
        if len(cur["input_ids"]) + len(ids) > max_length:
            flush()
            cur = {k: [] for k in keys}
        cur["input_ids"] += list(ids)
        cur["labels"] += list(ex["labels"][:max_length])
        cur["position_ids"] += list(range(len(ids)))
        for k in extra:
            cur[k] += list(ex[k][:max_length])
    flush()
    shape = (len(rows["input_ids"]), max_length)
    if not rows["input_ids"]:
        return {k: np.zeros((0, max_length), dtype=np.int64) for k in keys}
    return {k: np.asarray(v, dtype=np.int64).reshape(shape) for k, v in rows.items()}


def collate(examples: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, Any]:
    """Pad to the longest example: ``input_ids``, ``attention_mask``, ``labels`` (torch, int64)."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        sl = slice(0, k) if side == "right" else slice(n - k, n)
        ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, sl] = 1
        if "labels" in e:
            labels[i, sl] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# Ray Data


def tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The files of a tokenizer directory, to ship to Ray tasks that may run on other nodes."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


@functools.lru_cache(maxsize=4)
def _tokenizer_from(digest: str, files: tuple[tuple[str, bytes], ...]) -> Any:
    d = scratch_dir(f"tok-{digest[:8]}")
    for name, data in files:
        (d / name).write_bytes(data)
    return load_tokenizer(d)


def _files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name])
    return h.hexdigest()


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    """A tokenizer from :func:`tokenizer_files` output (loaded once per process and content)."""
    return _tokenizer_from(_files_digest(files), tuple(sorted(files.items())))


def tokenize_batch(batch: dict[str, np.ndarray], *, files: dict[str, bytes], digest: str,
                   max_length: int, train_on_prompt: bool, do_pack: bool,
                   route_columns: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """A Ray Data batch of records (``prompt``/``response``) or documents (``text``) → token rows.
    ``route_columns`` (domain → gate column, router supervision): every token of a record
    gets its domain's column as ``route_targets`` (-100 for a domain not listed)."""
    tok = _tokenizer_from(digest, tuple(sorted(files.items())))  # digest computed once, by the caller
    examples: list[dict[str, list[int]]] = []
    if "text" in batch:
        for text in batch["text"]:
            examples += encode_text(tok, str(text), max_length)
    else:
        domains = batch["domain"] if route_columns is not None else None
        for i, (p, r) in enumerate(zip(batch["prompt"], batch["response"], strict=True)):
            ex = encode_example(tok, str(p), str(r), max_length, train_on_prompt)
            if domains is not None:
                col = route_columns.get(str(domains[i]), IGNORE_INDEX)
                ex[ROUTE_TARGETS] = [col] * len(ex["input_ids"])
            examples.append(ex)
    if do_pack:
        return pack(examples, max_length, tok.pad_token_id)
    # one example per row, right-padded to max_length
    rows = [pack([e], max_length, tok.pad_token_id) for e in examples]
    keys = ("input_ids", "labels", "position_ids") + ((ROUTE_TARGETS,) if route_columns else ())
    return {k: np.concatenate([r[k] for r in rows]) if rows else np.zeros((0, max_length), np.int64)
            for k in keys}


def tokenized_dataset(ds: Any, tokenizer_dir: str | Path, max_length: int,
                      train_on_prompt: bool = False, do_pack: bool = True,
                      batch_size: int = 256, route_columns: dict[str, int] | None = None) -> Any:
    """Map a Ray Data dataset of records or documents to fixed-length integer token rows."""
    files = tokenizer_files(tokenizer_dir)
    fn = functools.partial(tokenize_batch, files=files, digest=_files_digest(files),
                           max_length=max_length, train_on_prompt=train_on_prompt, do_pack=do_pack,
                           route_columns=route_columns)
    return ds.map_batches(fn, batch_format="numpy", batch_size=batch_size)
