"""Request-level routing: a classifier that picks the experts of a whole request from its prompt.

Why: the paper's per-token routers, trained for a few steps, barely separate the domains (their
gates stay near uniform), so each domain expert is diluted at inference. The frozen base model's
hidden states already tell the domains apart: a linear head on the prompt's mean-pooled hidden
states (the middle and the last layer) classifies the domain of a request almost perfectly, and
routing the request by it gets the pinned experts' quality (docs/method.md, "Options beyond the
paper"). Classes are ``[universal, *domains]``: the first means "no domain expert" (general text:
the universal expert alone), so general ability stays that of the universal expert.

The head is trained in the router stage (``fit``), saved as the ``classifier`` expert, and grows
a class when a domain is added (then retrained with the routers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RequestRouter", "feature_layers", "request_gate_weights"]


def feature_layers(n_layers: int) -> tuple[int, int]:
    """Which hidden states are pooled: the middle layer and the last (index 0 = embeddings)."""
    return (max(1, n_layers // 2), n_layers)


class RequestRouter(nn.Module):
    """``softmax(W (f - mean) / scale + b)`` over ``[universal, *domains]``, where ``f`` is the
    concatenation of the mean-pooled hidden states of :func:`feature_layers`."""

    def __init__(self, hidden_size: int, n_layers: int, n_domains: int, *, device=None):
        super().__init__()
        self.layers = feature_layers(n_layers)
        d = hidden_size * len(self.layers)
        self.head = nn.Linear(d, 1 + n_domains, device=device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.zeros(d, device=device))
        self.register_buffer("scale", torch.ones(d, device=device))
        # set by fit() or by loading a trained head; an untrained head routes nothing
        self.trained = False
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def n_features(self) -> int:
        return self.head.in_features

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def pool(self, hidden_states: tuple[Tensor, ...], attention_mask: Tensor | None) -> Tensor:
        """(batch, n_features) from a forward's ``hidden_states`` (mean over real tokens)."""
        first = hidden_states[0]
        mask = (attention_mask if attention_mask is not None else
                torch.ones(first.shape[:2], device=first.device)).to(first.device, torch.float32)
        w = (mask / mask.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(-1)
        return torch.cat([(hidden_states[i].float() * w).sum(1) for i in self.layers], -1)

    def logits(self, features: Tensor) -> Tensor:
        return self.head((features.float() - self.mean) / self.scale)

    def probs(self, features: Tensor) -> Tensor:
        return torch.softmax(self.logits(features), -1)

    def add_class(self) -> None:
        """A new domain: one more class (zero weights: the head must be retrained)."""
        w, b = self.head.weight.data, self.head.bias.data
        head = nn.Linear(w.shape[1], w.shape[0] + 1, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:-1] = w
            head.bias[:-1] = b
        self.head = head.requires_grad_(False)
        self.trained = False

    def remove_class(self, index: int) -> None:
        keep = [i for i in range(self.n_classes) if i != index]
        w, b = self.head.weight.data[keep].clone(), self.head.bias.data[keep].clone()
        head = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        self.head = head.requires_grad_(False)

    def fit(self, features: Tensor, labels: Tensor, *, steps: int = 300, lr: float = 1e-2,
            weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
        """Train the head on (features, class labels): standardise the features, then Adam on
        cross-entropy. Deterministic for a seed, so data-parallel workers that fit the same
        data get the same head. Returns the training accuracy and loss."""
        features = features.float()
        if features.shape[0] != labels.shape[0] or features.shape[1] != self.n_features:
            raise ValueError(f"features must be (n, {self.n_features}) with one label each, got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        labels = labels.to(features.device, torch.long)
        if int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes - 1}]")
        self.mean.copy_(features.mean(0))
        self.scale.copy_(features.std(0, unbiased=False).clamp_min(1e-5))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        params = list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        n = features.shape[0]
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(features.device)
                    loss = F.cross_entropy(self.logits(features[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        self.trained = True
        with torch.no_grad():
            logits = self.logits(features)
            return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                    "loss": float(F.cross_entropy(logits, labels))}


def request_gate_weights(probs: Tensor, variant: str, top_k: int | None) -> Tensor:
    """Per-row gate weights over the model's gate columns from class probabilities over
    ``[universal, *domains]``.

    Semantics: keep the ``top_k`` most likely classes (``None``: all), renormalise their
    probabilities to sum to 1. Flan's gate columns are ``[universal, *domains]``, the classes
    themselves; Res's are ``[*domains]`` (the universal expert is always on), so the
    "universal" class's share goes to no domain expert: top-1 on it is the universal expert
    alone.
    """
    probs = probs.float()
    if top_k is not None and top_k < probs.shape[-1]:
        top, idx = probs.topk(top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter(-1, idx, top)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    if variant == "flan":
        return probs
    if variant == "res":
        return probs[:, 1:]
    raise ValueError(f"request-level routing needs a MoDULA variant (flan, res), not {variant!r}")
