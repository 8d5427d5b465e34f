"""The built-in tokenizer: byte-level BPE trained offline with ``tokenizers`` on the general and
code corpora, saved as a standard Hugging Face tokenizer directory (``AutoTokenizer`` loads it)
with a chat template and eos / pad tokens.

The chat format is the single contract between training and serving: :func:`render_prompt` is
what a prompt becomes before the response starts (the chat template with
``add_generation_prompt=True``), and :func:`render_response` is the response plus eos. Training
masks the first out of the loss; serving feeds the first and generates the second. Tokenizers
without a chat template (some user base models) get :data:`FALLBACK_TEMPLATE`'s format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "train_tokenizer",
    "load_tokenizer",
    "render_prompt",
    "render_response",
    "render_chat",
]

PAD, EOS, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, EOS, USER, ASSISTANT, SYSTEM)

# one message per block; the assistant's turn ends with eos. `add_generation_prompt` opens the
# assistant turn, which is exactly the prefix the model continues from.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}" + USER + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "\n{{ message['content'] }}" + EOS + "\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "\n{% endif %}"
)
# the same format for a tokenizer that has no template of its own
FALLBACK_PROMPT = "User: {prompt}\nAssistant: "


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    model_max_length: int = 512) -> Any:
    """Train byte-level BPE on `texts`, save an HF tokenizer directory to `out_dir`, return it.

    The special tokens take the first ids (pad = 0, eos = 1); the 256 byte symbols are always in
    the vocabulary, so any text round-trips. Numbers are split into single digits before BPE (as
    Llama and Qwen2 do): merged digit runs ("216", "00") make the same number tokenise
    differently in different places, which a small model cannot learn arithmetic or unit
    conversion through.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return hf


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer from a local directory (never the hub); pad falls back to eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The text the model continues from: the chat template's prompt with the assistant turn open."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n" if system else ""
    return head + FALLBACK_PROMPT.format(prompt=prompt)


def render_response(tokenizer: Any, response: str) -> str:
    """The response as the model should produce it: text, then eos."""
    return response + (tokenizer.eos_token or "")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A whole conversation (serving: multi-turn chat), with the assistant's turn left open."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"Assistant: {m['content']}{tokenizer.eos_token or ''}\n")
        elif m["role"] == "user":
            parts.append(f"User: {m['content']}\n")
        else:
            parts.append(f"{m['content']}\n")
    return "".join(parts) + "Assistant: "
