"""User-data domains: parquet or JSONL files from a local path or ``s3://`` prefix.

A source is a file or a folder (prefix). Files whose names start with ``train``, ``validation``
(or ``valid`` / ``val``) and ``test`` give those splits; when there are none, all rows form one
pool that is split deterministically (:func:`modula.data.builtin.split_examples`). Every problem
is reported with the file and the row: a missing column, a null, a value that is not text, an
empty prompt, a line that is not JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from modula.config.schema import DomainConfig, StorageConfig
from modula.data.builtin import Example
from modula.errors import ModulaError
from modula.infra.storage import Storage

__all__ = ["UserDataError", "SourceFile", "list_source_files", "read_source", "read_user_file"]

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl",
               ".ndjson": "jsonl"}
_SPLIT_PREFIXES = (("validation", "validation"), ("valid", "validation"), ("val", "validation"),
                   ("train", "train"), ("test", "test"))


class UserDataError(ModulaError, ValueError):
    """A user-data problem, naming the file and (1-based) row or line."""

    def __init__(self, file: str, row: int | None, message: str):
        self.file, self.row, self.message = file, row, message
        where = f"{file}, row {row}" if row is not None else file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class SourceFile:
    uri: str  # what messages name
    key: str  # key under the source's Storage root ("" = the root is the file itself)
    format: str  # parquet | jsonl
    split: str | None  # train / validation / test when the file name says so


def _source_storage(source: str, storage_cfg: StorageConfig | None) -> Storage:
    """A Storage rooted at the source; s3:// sources use the storage section's endpoint and keys."""
    if source.startswith("s3://"):
        kw = {}
        if storage_cfg is not None:
            kw = {"endpoint": storage_cfg.endpoint, "region": storage_cfg.region,
                  "access_key_id": storage_cfg.access_key_id,
                  "secret_access_key": storage_cfg.secret_access_key}
        return Storage(StorageConfig(root=source, **kw))
    return Storage(StorageConfig(root=str(Path(source).expanduser())))


def _format_of(name: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    for ext, f in _EXTENSIONS.items():
        if name.lower().endswith(ext):
            return f
    return None


def _split_of(name: str) -> str | None:
    stem = name.rsplit("/", 1)[-1].lower()
    for prefix, split in _SPLIT_PREFIXES:
        if stem.startswith(prefix) and (len(stem) == len(prefix) or not stem[len(prefix)].isalpha()):
            return split
    return None


def list_source_files(domain: DomainConfig, storage_cfg: StorageConfig | None = None
                      ) -> tuple[Storage, list[SourceFile]]:
    """The data files of a user domain, sorted; raises UserDataError when there are none."""
    src = domain.source
    st = _source_storage(src, storage_cfg)
    if st.is_s3:
        keys = st.list("")
        single = not keys and st.exists("")
    else:
        p = Path(st.uri())
        if not p.exists():
            raise UserDataError(src, None, "no such file or folder")
        single = p.is_file()
        keys = [] if single else st.list("")
    if single:
        name = src.rstrip("/").rsplit("/", 1)[-1]
        fmt = _format_of(name, domain.format)
        if fmt is None:
            raise UserDataError(src, None, "cannot tell the format from the name "
                                "(allowed: .parquet, .jsonl, .json, .ndjson; or set `format:`)")
        return st, [SourceFile(src, "", fmt, None)]
    files = []
    for k in keys:
        base = k.rsplit("/", 1)[-1]
        if base.startswith((".", "_")):
            continue
        fmt = _format_of(base, domain.format)
        if fmt is None or (domain.format != "auto" and _format_of(base, "auto") not in (None, fmt)):
            continue
        files.append(SourceFile(st.uri(k), k, fmt, _split_of(base)))
    if not files:
        raise UserDataError(src, None, f"holds no {domain.format if domain.format != 'auto' else 'parquet or JSONL'} files")
    return st, files


def _check_value(file: str, row: int, column: str, value: object) -> str:
    if value is None:
        raise UserDataError(file, row, f"column {column!r} is null")
    if not isinstance(value, str):
        raise UserDataError(file, row, f"column {column!r} is {type(value).__name__}, expected text")
    return value


def read_user_file(st: Storage, f: SourceFile, domain: DomainConfig) -> list[Example]:
    """The examples of one file, every row checked."""
    pc, rc = domain.prompt_column, domain.response_column
    data = st.read_bytes(f.key)
    rows: list[tuple[int, dict]] = []
    if f.format == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserDataError(f.uri, None, f"not a parquet file ({exc})") from None
        missing = [c for c in (pc, rc) if c not in table.column_names]
        if missing:
            raise UserDataError(
                f.uri, 1 if table.num_rows else None,
                f"missing column {missing[0]!r} (columns: {', '.join(table.column_names)}; "
                f"set prompt_column / response_column)",
            )
        cols = table.select([pc, rc]).to_pydict()
        rows = [(i + 1, {pc: cols[pc][i], rc: cols[rc][i]}) for i in range(table.num_rows)]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserDataError(f.uri, None, f"not UTF-8 text ({exc})") from None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserDataError(f.uri, n, f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserDataError(f.uri, n, f"expected a JSON object, got {type(obj).__name__}")
            for c in (pc, rc):
                if c not in obj:
                    raise UserDataError(
                        f.uri, n, f"missing column {c!r} (keys: {', '.join(map(str, obj)) or 'none'}; "
                        "set prompt_column / response_column)")
            rows.append((n, obj))
    out = []
    for n, obj in rows:
        prompt = _check_value(f.uri, n, pc, obj[pc])
        response = _check_value(f.uri, n, rc, obj[rc])
        if not prompt.strip():
            raise UserDataError(f.uri, n, f"column {pc!r} is empty")
        if not response.strip():
            raise UserDataError(f.uri, n, f"column {rc!r} is empty")
        # each row is its own group: duplicates are removed and text never crosses splits
        out.append(Example(prompt, response, response.strip(), group=f"row:{prompt}"))
    return out


def read_source(domain: DomainConfig, storage_cfg: StorageConfig | None = None
                ) -> tuple[dict[str, list[Example]] | None, list[Example]]:
    """(examples per named split, or None; the unnamed pool) of a user domain."""
    st, files = list_source_files(domain, storage_cfg)
    named: dict[str, list[Example]] = {}
    pool: list[Example] = []
    for f in files:
        examples = read_user_file(st, f, domain)
        if f.split:
            named.setdefault(f.split, []).extend(examples)
        else:
            pool.extend(examples)
    if not named and not pool:
        raise UserDataError(domain.source, None, "holds no rows")
    return (named or None), pool
