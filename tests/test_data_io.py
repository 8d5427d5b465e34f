"""Parquet in storage (local and S3), the build cache, and user-data domains with their errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modula.config import DomainConfig, ModulaConfig, StorageConfig
from modula.data.build import build_data, build_domain, domain_fingerprint, ensure_data
from modula.data.builtin import builtin_splits
from modula.data.io import read_manifest, read_records, read_table
from modula.data.userdata import UserDataError, read_source
from modula.infra.layout import split_key
from modula.infra.storage import Storage

SMALL = {"train": 60, "validation": 10, "test": 10}


def _cfg(root, **domains) -> ModulaConfig:
    return ModulaConfig(
        storage=StorageConfig(root=str(root)),
        domains=[DomainConfig(name=n, splits=SMALL, **kw) for n, kw in domains.items()],
    )


def test_parquet_round_trip_local(tmp_path):
    st = Storage(StorageConfig(root=str(tmp_path)))
    d = DomainConfig(name="math", splits=SMALL)
    m = build_domain(d, st)
    assert m["counts"] == SMALL and not m["cached"]
    expected = builtin_splits("math", SMALL, 0)
    for s in SMALL:
        rows = read_records(st, "math", s)
        assert [(r["prompt"], r["response"], r["answer"], r["group"]) for r in rows] == [
            (e.prompt, e.response, e.answer, e.group) for e in expected[s]]
        assert all(r["domain"] == "math" and r["id"].startswith("math-") for r in rows)
        # a plain parquet file any tool can read
        t = pq.read_table(tmp_path / "data" / "math" / f"{s}.parquet")
        assert t.column_names == ["id", "domain", "group", "prompt", "response", "answer"]
    # same fingerprint: not rebuilt; a changed size: rebuilt
    assert build_domain(d, st)["cached"]
    d2 = DomainConfig(name="math", splits={**SMALL, "test": 12})
    assert domain_fingerprint(d2) != domain_fingerprint(d)
    assert build_domain(d2, st)["counts"]["test"] == 12


def test_build_data_writes_corpus_without_held_out_groups(tmp_path):
    cfg = _cfg(tmp_path, general={"metric": "perplexity"}, units={})
    st = Storage(cfg.storage)
    out = build_data(cfg, st)
    # the built-in model needs code too, so it is built although not listed
    assert set(out) == {"general", "units", "code"}
    assert out["code"]["counts"]["train"] == 2000  # the default sizes
    for name, train in (("general", SMALL["train"]), ("code", 2000)):
        corpus = read_table(st, split_key(name, "corpus")).to_pylist()
        assert corpus and sum(len(r["text"]) for r in corpus) <= 1000 * train
        held = set(read_manifest(st, name)["held_out_groups"])
        assert not {r["group"] for r in corpus} & held
        # held out of either domain is held out of both corpora
        for other in ("general", "code"):
            for s in ("validation", "test"):
                assert {r["group"] for r in read_records(st, other, s)} <= held
    ensure_data(cfg, st)  # everything there: no error, nothing rebuilt
    assert read_manifest(st, "units")["built_at"] == out["units"]["built_at"]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_user_jsonl_with_custom_columns_and_named_splits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "train.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(50)])
    _write_jsonl(src / "test.jsonl", [{"q": f"held {i}", "a": f"out {i}"} for i in range(8)])
    cfg = ModulaConfig(storage=StorageConfig(root=str(tmp_path / "store")), domains=[
        DomainConfig(name="math", splits=SMALL),
        DomainConfig(name="faq", source=str(src), prompt_column="q", response_column="a",
                     splits={"train": 100, "validation": 5, "test": 10}),
    ])
    st = Storage(cfg.storage)
    m = build_data(cfg, st, domains=["faq"])["faq"]
    assert m["counts"] == {"train": 45, "validation": 5, "test": 8}
    test = read_records(st, "faq", "test")
    assert {r["prompt"] for r in test} == {f"held {i}" for i in range(8)}
    train = {r["prompt"] for r in read_records(st, "faq", "train")}
    val = {r["prompt"] for r in read_records(st, "faq", "validation")}
    assert not train & val and all(p.startswith("question") for p in train | val)
    # unchanged content: cached; changed content: rebuilt
    assert build_data(cfg, st, domains=["faq"])["faq"]["cached"]
    _write_jsonl(src / "test.jsonl", [{"q": f"held {i}", "a": f"new {i}"} for i in range(8)])
    assert not build_data(cfg, st, domains=["faq"])["faq"]["cached"]


def test_user_parquet_single_pool_is_split(tmp_path):
    f = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(40)],
                             "response": [f"r{i}" for i in range(40)]}), f)
    named, pool = read_source(DomainConfig(name="x", source=str(f)))
    assert named is None and len(pool) == 40


@pytest.mark.parametrize("rows, row, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], 2, "missing column 'response'"),
    ([{"prompt": "a", "response": "b"}, "{not json"], 2, "not valid JSON"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}], 2, "'response' is null"),
    ([{"prompt": 7, "response": "b"}], 1, "'prompt' is int, expected text"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": " ", "response": "e"}],
     3, "'prompt' is empty"),
    ([["a", "b"]], 1, "expected a JSON object"),
])
def test_user_jsonl_errors_name_file_and_row(tmp_path, rows, row, message):
    f = tmp_path / "bad.jsonl"
    _write_jsonl(f, rows)
    with pytest.raises(UserDataError) as ei:
        read_source(DomainConfig(name="x", source=str(tmp_path)))
    assert ei.value.file == str(f) and ei.value.row == row
    assert message in str(ei.value) and f"{f}, row {row}" in str(ei.value)


def test_user_parquet_errors_name_file_and_row(tmp_path):
    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "response": ["x", "y"]}), f)
    with pytest.raises(UserDataError, match=r"train.parquet, row 1: missing column 'prompt' \(columns: question, response"):
        read_source(DomainConfig(name="x", source=str(tmp_path)))
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "response": ["x", None, "z"]}), f)
    with pytest.raises(UserDataError, match=r"train.parquet, row 2: column 'response' is null"):
        read_source(DomainConfig(name="x", source=str(tmp_path)))
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserDataError, match="not a parquet file"):
        read_source(DomainConfig(name="x", source=str(tmp_path)))


def test_user_source_missing_or_empty(tmp_path):
    with pytest.raises(UserDataError, match="no such file or folder"):
        read_source(DomainConfig(name="x", source=str(tmp_path / "nope")))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserDataError, match="holds no parquet or JSONL files"):
        read_source(DomainConfig(name="x", source=str(tmp_path)))


@pytest.mark.integration
def test_parquet_round_trip_s3_and_user_data_from_s3(s3_server, tmp_path):
    from tests.conftest import s3_storage_config

    sc = s3_storage_config(s3_server)
    st = Storage(sc)
    st.ensure_bucket()
    m = build_domain(DomainConfig(name="units", splits=SMALL), st)
    assert m["counts"] == SMALL
    expected = builtin_splits("units", SMALL, 0)["test"]
    assert [r["prompt"] for r in read_records(st, "units", "test")] == [e.prompt for e in expected]
    # a user domain read from s3://, errors name the s3 object
    st.write_text("user/train.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n')
    src = f"{sc.root}/user"
    with pytest.raises(UserDataError, match=r"s3://.*/user/train.jsonl, row 2: missing column 'response'"):
        read_source(DomainConfig(name="faq", source=src), sc)
    st.write_text("user/train.jsonl", "".join(
        json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(30)))
    named, pool = read_source(DomainConfig(name="faq", source=src), sc)
    assert len(named["train"]) == 30 and not pool
