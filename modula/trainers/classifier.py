"""The request classifier's part of the router stage: its data and its fit on a worker.

The router stage trains, besides the per-layer routers, the classifier that routes a whole
request by its prompt (:mod:`modula.model.request_router`). Its data is a sample of every class's
training prompts (``general`` is the class ``universal``: no domain expert), tokenised on the
driver as fixed-length rows; each worker computes the frozen base model's features for its shard,
the workers exchange them, and every worker fits the same head (same data, same seed), so rank 0
saves what all hold.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from modula.config.schema import ModulaConfig, StageConfig
from modula.data.io import read_records
from modula.data.tokenizer import render_prompt
from modula.infra.storage import Storage

__all__ = ["CLASSIFY_KEY", "classifier_dataset", "fit_classifier"]

# the dataset name of the classifier's rows in a router run
CLASSIFY_KEY = "classify"
# classifier prompts keep their last tokens, as serving and evaluation do for long prompts
_MAX_PROMPT = 256


def _rows(cfg: ModulaConfig, storage: Storage, tokenizer: Any, domains: list[str],
          split: str, per_class: int, seed: int) -> dict[str, np.ndarray]:
    length = min(_MAX_PROMPT, cfg.model.max_length)
    pad = int(tokenizer.pad_token_id or 0)
    ids, lengths, labels = [], [], []
    rng = random.Random(seed)
    for label, domain in enumerate(["general", *domains]):
        records = read_records(storage, domain, split)
        rng.shuffle(records)
        for r in records[:per_class]:
            tok = tokenizer(render_prompt(tokenizer, r["prompt"]),
                            add_special_tokens=False)["input_ids"][-length:]
            ids.append(tok + [pad] * (length - len(tok)))
            lengths.append(len(tok))
            labels.append(label)
    return {"input_ids": np.asarray(ids, dtype=np.int64).reshape(len(ids), length),
            "length": np.asarray(lengths, dtype=np.int64),
            "label": np.asarray(labels, dtype=np.int64)}


def classifier_dataset(cfg: ModulaConfig, storage: Storage, tokenizer: Any, domains: list[str],
                       section: StageConfig, split: str = "train") -> Any:
    """The classifier's rows for a router run (Ray Data): ``section.classifier_examples``
    prompts of each class, labels 0 (``general``) and 1..n (``domains`` in router order)."""
    import ray.data

    rows = _rows(cfg, storage, tokenizer, domains, split, section.classifier_examples,
                 section.seed)
    return ray.data.from_items([
        {"input_ids": ids, "length": int(n), "label": int(y)}
        for ids, n, y in zip(rows["input_ids"], rows["length"], rows["label"], strict=True)])


def _features(model: Any, shard: Any, batch_size: int = 32) -> tuple[Any, Any]:
    import torch

    feats, labels = [], []
    device = next(model.parameters()).device
    for batch in shard.iter_torch_batches(batch_size=batch_size):
        ids = batch["input_ids"].to(device)
        n = batch["length"].to(device)
        width = int(n.max())
        mask = (torch.arange(width, device=device)[None, :] < n[:, None]).long()
        feats.append(model.request_features(ids[:, :width], mask).cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        rr = model.request_router
        return torch.zeros(0, rr.n_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def fit_classifier(model: Any, shard: Any, section: StageConfig, world: int) -> dict[str, float]:
    """Fit the model's request classifier on a worker (every rank calls it): features of this
    worker's shard, gathered from all workers, one deterministic fit. Returns its training
    accuracy and loss."""
    import torch
    import torch.distributed as dist

    feats, labels = _features(model, shard)
    if world > 1 and dist.is_initialized():
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (feats, labels))
        feats = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
    return model.request_router.fit(feats, labels, steps=section.classifier_steps,
                                    seed=section.seed)
