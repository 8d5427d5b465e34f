"""The built-in tiny Llama: its config, seeded init, fingerprint, and resolving model.base."""

from __future__ import annotations

import pytest
import torch

from modula.basemodel import (
    BaseModelMissing,
    build_model,
    builtin_fingerprint,
    count_parameters,
    llama_config,
    load_base_model,
    resolve_base_dir,
)
from modula.config import ModulaConfig, StorageConfig, TinyModelConfig
from modula.data.tokenizer import train_tokenizer
from modula.infra.storage import Storage

TINY = TinyModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_position_embeddings=128, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(["some text to learn from, and some code: def f(): pass"] * 50, 300,
                           tmp_path_factory.mktemp("btok"))


def test_llama_config_follows_the_tiny_config(tok):
    c = llama_config(TINY, tok)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (32, 2, 4, 2, 64, 128)
    assert c.vocab_size == max(256, len(tok))
    assert c.pad_token_id == tok.pad_token_id and c.eos_token_id == tok.eos_token_id
    assert c.tie_word_embeddings


def test_seeded_init_and_parameter_count(tok):
    a, b = build_model(TINY, tok), build_model(TINY, tok)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    c = build_model(TINY.model_copy(update={"seed": 4}), tok)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    v, h, i, L = a.config.vocab_size, 32, 64, 2
    per_layer = h * h * 2 + 2 * h * (h // 4 * 2) + 3 * h * i + 2 * h  # q,o + k,v + mlp + norms
    assert count_parameters(a) == v * h + L * per_layer + h  # tied head counted once


def test_default_size_is_a_few_million():
    class T:
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

        def __len__(self):
            return 4096

    n = count_parameters(build_model(TinyModelConfig(), T()))
    assert 1_000_000 < n < 5_000_000


def test_fingerprint_tracks_model_data_and_pretraining():
    base = ModulaConfig()
    fp = builtin_fingerprint(base)
    assert fp == builtin_fingerprint(ModulaConfig())
    for change in ({"model": {"tiny": {"hidden_size": 96}}},
                   {"stages": {"pretrain": {"steps": 700, "lr": 3e-3, "warmup_steps": 50}}},
                   {"domains": [{"name": "general", "metric": "perplexity", "seed": 1},
                                {"name": "math"}]}):
        assert builtin_fingerprint(ModulaConfig(**change)) != fp, change
    # what does not change the weights does not change the fingerprint
    same = ModulaConfig()
    same.stages.pretrain.checkpoint_every = 7
    same.stages.pretrain.max_failures = 0
    same.stages.pretrain.scaling.num_workers = 2
    same.domains[2].metric = "accuracy"
    assert builtin_fingerprint(same) == fp


def test_resolve_and_load_any_hf_directory(tok, tmp_path):
    m = build_model(TINY, tok)
    m.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    cfg = ModulaConfig(model={"base": str(tmp_path / "hf")})
    assert resolve_base_dir(cfg) == tmp_path / "hf"
    model, t = load_base_model(cfg)
    assert not model.training and t.get_vocab() == tok.get_vocab()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, m(input_ids=ids).logits)


def test_missing_models_say_what_to_do(tmp_path):
    cfg = ModulaConfig(storage=StorageConfig(root=str(tmp_path)))
    with pytest.raises(BaseModelMissing, match="modula pretrain"):
        resolve_base_dir(cfg, Storage(cfg.storage))
    with pytest.raises(BaseModelMissing, match="no config.json"):
        resolve_base_dir(ModulaConfig(model={"base": str(tmp_path)}))
