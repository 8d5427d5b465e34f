"""The built-in tokenizer (an HF directory with a chat template), prompt masking, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modula.data.builtin import builtin_splits
from modula.data.encode import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_text,
    pack,
    tokenize_batch,
    tokenizer_files,
    tokenizer_from_files,
)
from modula.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    load_tokenizer,
    render_chat,
    render_prompt,
    render_response,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    sizes = {"train": 300, "validation": 5, "test": 5}
    texts = [f"{e.prompt}\n{e.response}" for n in ("general", "code")
             for e in builtin_splits(n, sizes, 0)["train"]]
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 600, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_saved_as_a_standard_hf_tokenizer(tok_dir, tok):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert len(auto) == len(tok) <= 600
    assert auto.eos_token == "<|eos|>" and auto.pad_token == "<|pad|>"
    assert auto.pad_token_id != auto.eos_token_id
    assert auto.chat_template == CHAT_TEMPLATE
    for t in SPECIAL_TOKENS:  # each special token is one id
        assert len(auto(t, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x ** 2  # square\n",
    "Größe, naïve café — 日本語 and emoji 🐍!",
    "  leading and trailing spaces  \t\n",
    "",
])
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ["Convert 21600 seconds to hours.", "x = 1000007 + 42",
                                  "the answer is 84."])
def test_numbers_are_single_digits(tok, text):
    """Every digit is its own token, so a number tokenises the same wherever it stands."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    for piece in pieces:
        assert not any(c.isdigit() for c in piece) or len(piece.strip()) == 1, pieces


def test_chat_template_is_the_training_prompt(tok):
    p = render_prompt(tok, "Convert 3 km to m.")
    assert p == "<|user|>\nConvert 3 km to m.\n<|assistant|>\n"
    assert render_response(tok, "3000 m") == "3000 m<|eos|>"
    chat = render_chat(tok, [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "2+2?"}])
    assert chat == ("<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello<|eos|>\n"
                    "<|user|>\n2+2?\n<|assistant|>\n")


def test_tokenizer_without_template_falls_back(tok):
    class Plain:
        chat_template = None
        eos_token = "</s>"

    assert render_prompt(Plain(), "hi") == "User: hi\nAssistant: "
    assert render_chat(Plain(), [{"role": "user", "content": "hi"}]) == "User: hi\nAssistant: "


def test_encode_masks_the_prompt(tok):
    e = encode_example(tok, "What is 2 + 2?", "4", 64)
    n_prompt = len(tok(render_prompt(tok, "What is 2 + 2?"), add_special_tokens=False)["input_ids"])
    assert e["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
    assert e["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(e["input_ids"][n_prompt:]) == "4<|eos|>"
    full = encode_example(tok, "What is 2 + 2?", "4", 64, train_on_prompt=True)
    assert full["labels"] == full["input_ids"]


def test_encode_truncates_keeping_the_assistant_turn(tok):
    e = encode_example(tok, "word " * 200, "answer " * 200, 40)
    assert len(e["input_ids"]) == 40
    text = tok.decode(e["input_ids"])
    assert "<|assistant|>" in text and not text.startswith("<|user|>")
    assert sum(x != IGNORE_INDEX for x in e["labels"]) == 20  # the prompt keeps half


def test_encode_text_pieces(tok):
    text = "lorem ipsum dolor sit amet " * 60
    full = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = encode_text(tok, text, 32)
    joined = [t for p in pieces for t in p["input_ids"]]
    assert all(len(p["input_ids"]) <= 32 for p in pieces)
    assert joined == full[: len(joined)]  # in order, nothing lost but a short tail
    assert len(full) - len(joined) < 16
    assert all(p["labels"] == p["input_ids"] for p in pieces)
    short = encode_text(tok, "a few words", 32, min_tokens=1)
    assert short[0]["input_ids"][-1] == tok.eos_token_id


def test_pack_rows_and_positions():
    exs = [{"input_ids": [1] * 5, "labels": [1] * 5}, {"input_ids": [2] * 4, "labels": [-100, 2, 2, 2]},
           {"input_ids": [3] * 6, "labels": [3] * 6}]
    p = pack(exs, 10, pad_id=0)
    assert p["input_ids"].shape == (2, 10) and p["input_ids"].dtype == np.int64
    assert p["input_ids"][0].tolist() == [1] * 5 + [2] * 4 + [0]
    assert p["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert p["labels"][0].tolist() == [1] * 5 + [-100, 2, 2, 2] + [-100]
    assert p["input_ids"][1].tolist() == [3] * 6 + [0] * 4
    assert p["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


def test_packed_examples_do_not_see_each_other(tok):
    """Restarting position ids + no attention mask = each packed example attends only to itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    a = encode_example(tok, "What is 2 + 2?", "4", 64)
    b = encode_example(tok, "Convert 3 km to m.", "3000 m", 64)
    p = pack([a, b], 64, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor(p["input_ids"]),
                       position_ids=torch.tensor(p["position_ids"]), use_cache=False).logits
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits
        # the mask is what keeps them apart: one position sequence would mix them
        mixed = model(input_ids=torch.tensor(p["input_ids"]), use_cache=False).logits
    na, nb = len(a["input_ids"]), len(b["input_ids"])
    torch.testing.assert_close(packed[0, na:na + nb], alone[0], atol=1e-5, rtol=1e-4)
    assert (mixed[0, na:na + nb] - alone[0]).abs().max() > 1e-3


def test_collate_pads_and_masks(tok):
    exs = [encode_example(tok, "a", "b", 32), encode_example(tok, "a longer prompt here", "c", 32)]
    right = collate(exs, tok.pad_token_id)
    n0 = len(exs[0]["input_ids"])
    assert right["attention_mask"][0].tolist()[:n0] == [1] * n0
    assert right["attention_mask"][0, n0:].sum() == 0
    assert (right["labels"][0, n0:] == IGNORE_INDEX).all()
    left = collate(exs, tok.pad_token_id, side="left")
    assert left["input_ids"][0, -n0:].tolist() == exs[0]["input_ids"]
    assert left["attention_mask"][0, :-n0].sum() == 0


def test_tokenize_batch_for_ray_data_has_only_int_columns(tok_dir, tok):
    files = tokenizer_files(tok_dir)
    assert tokenizer_from_files(files).get_vocab() == tok.get_vocab()
    from modula.data.encode import _files_digest

    batch = {"prompt": np.array(["a", "b", "c"], dtype=object),
             "response": np.array(["x", "y", "z"], dtype=object)}
    out = tokenize_batch(batch, files=files, digest=_files_digest(files), max_length=64,
                         train_on_prompt=False, do_pack=True)
    assert set(out) == {"input_ids", "labels", "position_ids"}
    assert out["input_ids"].shape == (1, 64) and all(v.dtype == np.int64 for v in out.values())
    docs = {"text": np.array(["some words " * 50], dtype=object)}
    out = tokenize_batch(docs, files=files, digest=_files_digest(files), max_length=32,
                         train_on_prompt=True, do_pack=False)
    assert out["input_ids"].shape[1] == 32 and (out["labels"] != IGNORE_INDEX).sum() > 32
