"""Datasets in storage: parquet written with pyarrow under ``storage.root`` and read back as
pyarrow tables (driver side: eval, small checks) or Ray Data datasets (trainers).

Where the splits live is :mod:`modula.infra.layout` (``data/<domain>/<split>.parquet``, with
``corpus`` the pretraining text of general and code, and ``manifest.json`` the fingerprint,
counts and source of the build).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modula.errors import ModulaError
from modula.infra.layout import data_manifest_key, split_key
from modula.infra.storage import Storage

__all__ = [
    "RECORD_SCHEMA",
    "CORPUS_SCHEMA",
    "DataMissing",
    "write_table",
    "read_table",
    "read_records",
    "read_manifest",
    "read_dataset",
    "records_table",
]

RECORD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("domain", pa.string()),
    ("group", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("answer", pa.string()),
])
CORPUS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("domain", pa.string()),
    ("group", pa.string()),
    ("text", pa.string()),
])


class DataMissing(ModulaError, FileNotFoundError):
    """A split that has not been built; the message says which command builds it."""


def _missing(storage: Storage, key: str) -> DataMissing:
    return DataMissing(f"{storage.uri(key)} does not exist: run `modula data build` first")


def records_table(rows: list[dict[str, str]], schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    """A table of `rows` (dicts with the schema's fields) in the schema's column order."""
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(storage: Storage, key: str, table: pa.Table) -> None:
    """Write a parquet object whole (a reader never sees half a file)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(key, buf.getvalue())


def read_table(storage: Storage, key: str) -> pa.Table:
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        raise _missing(storage, key) from None
    return pq.read_table(io.BytesIO(data))


def read_records(storage: Storage, domain: str, split: str, limit: int | None = None
                 ) -> list[dict[str, Any]]:
    """The rows of one split as dicts, in file order (the first `limit` if given)."""
    table = read_table(storage, split_key(domain, split))
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def read_manifest(storage: Storage, domain: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(data_manifest_key(domain)))
    except FileNotFoundError:
        return None


def read_dataset(storage: Storage, domains: str | list[str], split: str) -> Any:
    """One split of one or more domains as a Ray Data dataset, read straight from storage."""
    import ray.data

    names = [domains] if isinstance(domains, str) else list(domains)
    paths = []
    for d in names:
        key = split_key(d, split)
        if not storage.exists(key):
            raise _missing(storage, key)
        paths.append(storage.arrow_path(key))
    return ray.data.read_parquet(paths, filesystem=storage.arrow_filesystem())
