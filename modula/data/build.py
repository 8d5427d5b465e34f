"""Building the datasets and the built-in tokenizer into storage, cached by fingerprint.

A domain's fingerprint covers everything its rows depend on: the generator version, the Python
whose standard library feeds ``general`` and ``code``, and the domain's config (sizes, seed,
columns, source). ``data/<domain>/manifest.json`` records it, and a build whose fingerprint is
already there is skipped. User sources are re-read by ``modula data build`` (their content hash is
in the manifest) and trusted as built by :func:`ensure_data`.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modula.config.schema import DomainConfig, ModulaConfig
from modula.data.builtin import (
    BUILDER_VERSION,
    CORPUS_MAX_CHARS,
    SPLITS,
    Example,
    builtin_splits,
    corpus_documents,
    python_tag,
    split_examples,
)
from modula.data.io import CORPUS_SCHEMA, read_manifest, read_table, records_table, write_table
from modula.data.tokenizer import train_tokenizer
from modula.data.userdata import read_source
from modula.errors import UnknownName
from modula.infra.layout import data_manifest_key, split_key, tokenizer_key
from modula.infra.storage import Storage

__all__ = [
    "domain_fingerprint",
    "build_domain",
    "build_data",
    "ensure_data",
    "builtin_domain_config",
    "tokenizer_fingerprint",
    "ensure_tokenizer",
    "CORPUS_DOMAINS",
]

# the built-in model and tokenizer are trained on these two domains
CORPUS_DOMAINS = ("general", "code")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def domain_fingerprint(domain: DomainConfig) -> str:
    """What a domain's built rows depend on (not its metric or reserved flag)."""
    spec = domain.model_dump(mode="json", exclude={"metric", "reserved"})
    if domain.source == "builtin":
        spec.update(builder=BUILDER_VERSION, python=python_tag())
    return _hash(spec)


def builtin_domain_config(cfg: ModulaConfig, name: str) -> DomainConfig:
    """The config's entry for built-in domain `name`, or the defaults when it is not listed
    (the built-in model needs ``general`` and ``code`` even if a config trains neither)."""
    for d in cfg.domains:
        if d.name == name and d.source == "builtin":
            return d
    return DomainConfig(name=name, metric="perplexity")


def _rows(domain: str, examples: list[Example]) -> list[dict[str, str]]:
    return [
        {"id": f"{domain}-{ex.uid}", "domain": domain, "group": ex.group, "prompt": ex.prompt,
         "response": ex.response, "answer": ex.answer}
        for ex in examples
    ]


def _user_splits(domain: DomainConfig, storage: Storage) -> tuple[dict[str, list[Example]], str]:
    named, pool = read_source(domain, storage.cfg)
    sizes = domain.splits.model_dump()
    named = named or {}
    given = {s: ex for s, ex in named.items() if s in ("validation", "test")}
    rest = named.get("train", []) + pool
    rng = random.Random(f"user:{domain.name}:{domain.seed}")
    out: dict[str, list[Example]] = {}
    for s, ex in given.items():
        ex = sorted(ex, key=lambda e: e.uid)
        rng.shuffle(ex)
        out[s] = ex[: sizes[s]]
    held = {e.prompt for ex in out.values() for e in ex}
    rest = [e for e in rest if e.prompt not in held]
    carved = split_examples(rest, {s: (0 if s in out else sizes[s]) for s in SPLITS},
                            f"{domain.name}:{domain.seed}")
    for s in SPLITS:
        out.setdefault(s, carved[s])
    content = _hash(sorted(e.uid for ex in out.values() for e in ex))
    return out, content


def build_domain(domain: DomainConfig, storage: Storage, force: bool = False,
                 exclude_corpus_groups: set[str] | None = None) -> dict[str, Any]:
    """Write one domain's splits (and, for general/code, its corpus); returns the manifest."""
    fp = domain_fingerprint(domain)
    old = read_manifest(storage, domain.name)
    builtin = domain.source == "builtin"
    if old and old.get("fingerprint") == fp and not force and builtin:
        return {**old, "cached": True}
    t0 = time.time()
    if builtin:
        splits = builtin_splits(domain.name, domain.splits.model_dump(), domain.seed)
        content = _hash(sorted(e.uid for ex in splits.values() for e in ex))
    else:
        splits, content = _user_splits(domain, storage)
        if old and old.get("fingerprint") == fp and old.get("content") == content and not force:
            return {**old, "cached": True}
    counts = {}
    for s in SPLITS:
        write_table(storage, split_key(domain.name, s), records_table(_rows(domain.name, splits[s])))
        counts[s] = len(splits[s])
    manifest = {
        "domain": domain.name,
        "source": domain.source,
        "fingerprint": fp,
        "content": content,
        "counts": counts,
        "groups": {s: len({e.group for e in splits[s]}) for s in SPLITS},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if builtin and domain.name in CORPUS_DOMAINS:
        exclude = set(exclude_corpus_groups or ()) | {
            e.group for s in ("validation", "test") for e in splits[s]
        }
        # the corpus scales with the training split: 1,000 characters per training record,
        # at most CORPUS_MAX_CHARS (2M characters at the default 2,000 records)
        docs = corpus_documents(domain.name, exclude, seed=domain.seed,
                                max_chars=min(CORPUS_MAX_CHARS, 1000 * domain.splits.train))
        rows = [{"id": f"{domain.name}-corpus-{i:05d}", "domain": domain.name, "group": g, "text": t}
                for i, (g, t) in enumerate(docs)]
        write_table(storage, split_key(domain.name, "corpus"), records_table(rows, CORPUS_SCHEMA))
        counts["corpus"] = len(rows)
        manifest["corpus_chars"] = sum(len(t) for _, t in docs)
        manifest["held_out_groups"] = sorted(exclude)
    manifest["seconds"] = round(time.time() - t0, 2)
    storage.write_text(data_manifest_key(domain.name), json.dumps(manifest, indent=2))
    return {**manifest, "cached": False}


def _held_out_groups(domains: list[DomainConfig]) -> set[str]:
    """Validation/test groups of general and code: both corpora leave all of them out (a module
    held out of ``code`` must not be pretrained on through ``general``'s docstrings either)."""
    out: set[str] = set()
    for d in domains:
        if d.source == "builtin" and d.name in CORPUS_DOMAINS:
            splits = builtin_splits(d.name, d.splits.model_dump(), d.seed)
            out |= {e.group for s in ("validation", "test") for e in splits[s]}
    return out


def build_data(cfg: ModulaConfig, storage: Storage | None = None, domains: list[str] | None = None,
               force: bool = False, on_domain: Callable[[dict[str, Any]], None] | None = None,
               ) -> dict[str, dict[str, Any]]:
    """Build every configured domain (or those named), plus general and code for the built-in
    model when ``model.base`` is ``builtin:tiny``; returns the manifests by domain."""
    storage = storage or Storage(cfg.storage)
    wanted = [d for d in cfg.domains if domains is None or d.name in domains]
    unknown = sorted(set(domains or ()) - {d.name for d in cfg.domains})
    if unknown:
        raise UnknownName(
            f"unknown domains {unknown} (allowed: {', '.join(d.name for d in cfg.domains)})")
    if cfg.model.is_builtin and domains is None:
        have = {d.name for d in wanted}
        wanted += [builtin_domain_config(cfg, n) for n in CORPUS_DOMAINS if n not in have]
    corpus_cfgs = [builtin_domain_config(cfg, n) for n in CORPUS_DOMAINS]
    held: set[str] | None = None
    out = {}
    for d in wanted:
        if held is None and d.source == "builtin" and d.name in CORPUS_DOMAINS and (
                force or (read_manifest(storage, d.name) or {}).get("fingerprint") != domain_fingerprint(d)):
            held = _held_out_groups(corpus_cfgs)  # only when a corpus is (re)built
        m = build_domain(d, storage, force=force, exclude_corpus_groups=held)
        out[d.name] = m
        if on_domain:
            on_domain(m)
    return out


def ensure_data(cfg: ModulaConfig, storage: Storage | None = None,
                domains: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Build what is missing or stale; a domain already built with its fingerprint is reused."""
    storage = storage or Storage(cfg.storage)
    names = domains or [d.name for d in cfg.domains]
    todo = []
    for n in names:
        d = next((x for x in cfg.domains if x.name == n), None) or builtin_domain_config(cfg, n)
        m = read_manifest(storage, n)
        if not m or m.get("fingerprint") != domain_fingerprint(d):
            todo.append(n)
    if not todo:
        return {n: {**(read_manifest(storage, n) or {}), "cached": True} for n in names}
    extra = [n for n in todo if n not in {d.name for d in cfg.domains}]
    if extra:  # general/code for the built-in model, not listed in the config
        cfg = cfg.model_copy(update={"domains": cfg.domains + [builtin_domain_config(cfg, n) for n in extra]})
    build_data(cfg, storage, domains=todo)
    return {n: {**(read_manifest(storage, n) or {}), "cached": n not in todo} for n in names}


# --------------------------------------------------------------------------------------------
# the built-in tokenizer


def tokenizer_fingerprint(cfg: ModulaConfig) -> str:
    return _hash({
        "vocab_size": cfg.model.tiny.vocab_size,
        "data": [domain_fingerprint(builtin_domain_config(cfg, n)) for n in CORPUS_DOMAINS],
        "version": 2,  # 2: numbers split into single digits
    })


# the tokenizer learns its merges from this much text (about 1 s of training per MB)
_TOKENIZER_CHARS = 3_000_000


def _tokenizer_texts(storage: Storage) -> list[str]:
    texts: list[str] = []
    for n in CORPUS_DOMAINS:
        for r in read_table(storage, split_key(n, "train")).to_pylist():
            texts.append(f"{r['prompt']}\n{r['response']}")
    budget = _TOKENIZER_CHARS - sum(map(len, texts))
    corpora = [read_table(storage, split_key(n, "corpus")).column("text").to_pylist()
               for n in CORPUS_DOMAINS]
    for i in range(max(map(len, corpora))):  # interleave prose and code
        for docs in corpora:
            if i < len(docs) and budget > 0:
                texts.append(docs[i][:budget])
                budget -= len(texts[-1])
    return texts


def ensure_tokenizer(cfg: ModulaConfig, storage: Storage | None = None, force: bool = False
                     ) -> str:
    """Train (once per fingerprint) and store the built-in tokenizer; returns its storage key."""
    storage = storage or Storage(cfg.storage)
    key = tokenizer_key(tokenizer_fingerprint(cfg))
    if storage.exists(f"{key}/tokenizer.json") and not force:
        return key
    ensure_data(cfg, storage, list(CORPUS_DOMAINS))
    with tempfile.TemporaryDirectory(prefix="modula-tok-") as tmp:
        train_tokenizer(_tokenizer_texts(storage), cfg.model.tiny.vocab_size, tmp,
                        model_max_length=cfg.model.tiny.max_position_embeddings)
        # tokenizer.json last: its presence marks a complete directory
        for name in sorted(p.name for p in Path(tmp).iterdir()):
            if name != "tokenizer.json":
                storage.upload_file(f"{tmp}/{name}", f"{key}/{name}")
        storage.upload_file(f"{tmp}/tokenizer.json", f"{key}/tokenizer.json")
    return key
