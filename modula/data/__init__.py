"""Datasets: the built-in domain suite, user data (local or s3:// parquet / JSONL), parquet I/O in
storage and Ray Data read-back, the built-in tokenizer, tokenisation with the prompt masked out of
the loss, and packing.

Entry points for trainers, eval and serving:

- :func:`modula.data.build.build_data` / :func:`~modula.data.build.ensure_data`: write the splits;
- :func:`modula.data.io.read_dataset` (Ray Data) / :func:`~modula.data.io.read_records` (rows);
- :func:`modula.data.encode.tokenized_dataset`, :func:`~modula.data.encode.encode_example`,
  :func:`~modula.data.encode.pack`, :func:`~modula.data.encode.collate`;
- :func:`modula.data.build.ensure_tokenizer`, :func:`modula.data.tokenizer.load_tokenizer`,
  :func:`~modula.data.tokenizer.render_prompt` (the chat format serving must use).
"""

from modula.data.build import build_data, ensure_data, ensure_tokenizer
from modula.data.encode import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_text,
    pack,
    tokenized_dataset,
)
from modula.data.io import DataMissing, read_dataset, read_records, read_table
from modula.data.tokenizer import load_tokenizer, render_chat, render_prompt, render_response
from modula.data.userdata import UserDataError

__all__ = [
    "IGNORE_INDEX",
    "DataMissing",
    "UserDataError",
    "build_data",
    "collate",
    "encode_example",
    "encode_text",
    "ensure_data",
    "ensure_tokenizer",
    "load_tokenizer",
    "pack",
    "read_dataset",
    "read_records",
    "read_table",
    "render_chat",
    "render_prompt",
    "render_response",
    "tokenized_dataset",
]
