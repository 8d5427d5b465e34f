"""Storage on a local root and on S3 (moto's server on loopback, over HTTP): objects through
boto3, parquet through pyarrow's filesystem, conditional writes, and no credential leaks."""

from __future__ import annotations

import io
import logging
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY, s3_storage_config

from modula.config import StorageConfig, config_from_dict
from modula.infra.storage import Storage, StorageError

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        st = Storage(StorageConfig(root=str(tmp_path / "root")))
        st.ensure_bucket()
        return st
    return request.getfixturevalue("s3_storage")


def test_object_round_trip(storage):
    assert not storage.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/b.txt")
    with pytest.raises(FileNotFoundError):
        storage.size("a/b.txt")
    storage.write_text("a/b.txt", "héllo")
    storage.write_bytes("a/c/d.bin", bytes(range(256)) * 10)
    storage.write_bytes("top.bin", b"\x00")
    assert storage.exists("a/b.txt") and storage.read_text("a/b.txt") == "héllo"
    assert storage.read_bytes("a/c/d.bin") == bytes(range(256)) * 10
    assert storage.size("a/c/d.bin") == 2560
    assert storage.list("a") == ["a/b.txt", "a/c/d.bin"]
    assert storage.list() == ["a/b.txt", "a/c/d.bin", "top.bin"]
    assert storage.list_dirs() == ["a"] and storage.list_dirs("a") == ["c"]
    assert storage.list("nothing") == [] and storage.list_dirs("nothing") == []
    storage.write_text("a/b.txt", "second")  # overwrite
    assert storage.read_text("a/b.txt") == "second"
    storage.delete("a/b.txt")
    assert not storage.exists("a/b.txt") and storage.list("a") == ["a/c/d.bin"]
    with pytest.raises(StorageError):
        storage.write_text("../escape.txt", "x")


def test_folders_round_trip(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.safetensors").write_bytes(b"x" * 1000)
    (src / "sub" / "y.json").write_text('{"y": 1}')
    written = storage.upload_dir(src, "models/m1")
    assert written == ["models/m1/sub/y.json", "models/m1/x.safetensors"]
    out = storage.download_dir("models/m1", tmp_path / "out")
    assert (out / "x.safetensors").read_bytes() == b"x" * 1000
    assert (out / "sub" / "y.json").read_text() == '{"y": 1}'
    local = storage.local_dir("models/m1", cache_dir=tmp_path / "cache")
    assert (local / "sub" / "y.json").read_text() == '{"y": 1}'
    storage.upload_file(src / "x.safetensors", "one/file.bin")
    storage.download_file("one/file.bin", tmp_path / "dl" / "f.bin")
    assert (tmp_path / "dl" / "f.bin").read_bytes() == b"x" * 1000
    with pytest.raises(FileNotFoundError):
        storage.download_file("one/missing.bin", tmp_path / "dl" / "g.bin")
    with pytest.raises(FileNotFoundError):
        storage.download_dir("models/none", tmp_path / "out2")


def test_conditional_writes(storage):
    assert storage.create_bytes("ptr", b"1") is True
    assert storage.create_bytes("ptr", b"2") is False  # exists: not overwritten
    assert storage.read_bytes("ptr") == b"1"
    data, tag = storage.read_bytes_tagged("ptr")
    assert data == b"1"
    assert storage.replace_bytes("ptr", b"2", tag) is True
    assert storage.replace_bytes("ptr", b"3", tag) is False  # stale tag: someone wrote since
    assert storage.read_bytes("ptr") == b"2"
    assert storage.replace_bytes("new", b"a", None) is True
    assert storage.replace_bytes("new", b"b", None) is False
    assert storage.list() == ["new", "ptr"]  # no temporary or lock files show up


def test_create_bytes_race_has_exactly_one_winner(tmp_path):
    st = Storage(StorageConfig(root=str(tmp_path)))
    barrier = threading.Barrier(8)
    wins: list[int] = []

    def racer(i: int) -> None:
        barrier.wait()
        if st.create_bytes("claim", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and st.read_text("claim") == str(wins[0])


def _interleave_moto_puts(monkeypatch, key_suffix: str, parties: int = 2) -> None:
    """Hold every moto PUT of a key ending in `key_suffix` after its condition check and before
    its write until `parties` of them are there (or 2 s pass): the worst interleaving."""
    from moto.s3.models import S3Backend

    barrier = threading.Barrier(parties, timeout=2.0)
    real = S3Backend.put_object

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        if key_name.endswith(key_suffix):
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # the others never came (their check failed first): write alone
        return real(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)


def _race(n: int, fn) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.integration
def test_moto_checks_conditions_apart_from_the_write(s3_storage, monkeypatch):
    """What the loopback S3 guarantees: moto 5 checks If-None-Match / If-Match, then writes, in
    two steps; two requests whose checks both pass before either writes BOTH succeed (the last
    write wins). AWS S3 answers one of them 412 / 409. So on moto a conditional write is
    exclusive only when requests do not overlap; the registry's race tests therefore run
    moto with its PUT handler serialised (the AWS semantics), see the next test."""
    _interleave_moto_puts(monkeypatch, "/claim")
    wins = _race(2, lambda i: s3_storage.create_bytes("claim", f"{i}".encode()))
    assert wins == [True, True], "moto enforced If-None-Match atomically: update docs"
    assert s3_storage.read_text("claim") in ("0", "1")
    _, tag = s3_storage.read_bytes_tagged("claim")
    swaps = _race(2, lambda i: s3_storage.replace_bytes("claim", f"swap{i}".encode(), tag))
    assert swaps == [True, True], "moto enforced If-Match atomically: update docs"


@pytest.mark.integration
def test_serialised_moto_has_exactly_one_winner(s3_storage, monkeypatch,
                                                s3_atomic_conditional_writes):
    _interleave_moto_puts(monkeypatch, "/claim")
    wins = _race(2, lambda i: s3_storage.create_bytes("claim", f"{i}".encode()))
    assert sorted(wins) == [False, True]
    assert s3_storage.read_text("claim") == str(wins.index(True))
    _, tag = s3_storage.read_bytes_tagged("claim")
    swaps = _race(2, lambda i: s3_storage.replace_bytes("claim", f"swap{i}".encode(), tag))
    assert sorted(swaps) == [False, True]
    assert s3_storage.read_text("claim") == f"swap{swaps.index(True)}"


def test_parquet_through_the_arrow_filesystem(storage):
    fs = storage.arrow_filesystem()
    table = pa.table({"id": list(range(100)), "text": [f"row {i}" for i in range(100)]})
    path = storage.arrow_path("datasets/math/train.parquet")
    fs.create_dir(storage.arrow_path("datasets/math"), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    # the object is where the boto3/local side looks for it
    assert storage.exists("datasets/math/train.parquet")
    assert storage.list("datasets") == ["datasets/math/train.parquet"]
    back = pq.read_table(path, filesystem=fs)
    assert back.equals(table)
    assert pq.read_table(io.BytesIO(storage.read_bytes("datasets/math/train.parquet"))).equals(table)
    # what Ray Train's RunConfig(storage_path=..., storage_filesystem=...) gets
    run_path, run_fs = storage.ray_storage("runs")
    if storage.is_s3:
        assert not run_path.startswith("s3://") and run_path.endswith("/runs")
        assert run_path == f"{storage.bucket}/{storage.prefix}/runs"
        with run_fs.open_output_stream(f"{run_path}/exp/marker.txt") as f:
            f.write(b"ok")
        assert storage.read_bytes("runs/exp/marker.txt") == b"ok"
    else:
        assert run_fs is None and run_path == storage.uri("runs")


@pytest.mark.integration
def test_two_prefixes_in_one_bucket_do_not_see_each_other(s3_server):
    a = Storage(s3_storage_config(s3_server, bucket="modula-shared-bkt", prefix="team-a"))
    b = Storage(s3_storage_config(s3_server, bucket="modula-shared-bkt", prefix="team-b"))
    a.ensure_bucket()
    b.ensure_bucket()  # idempotent
    a.write_text("x.txt", "a")
    b.write_text("x.txt", "b")
    assert a.read_text("x.txt") == "a" and b.read_text("x.txt") == "b"
    assert a.list() == ["x.txt"] and a.uri("x.txt") == "s3://modula-shared-bkt/team-a/x.txt"


@pytest.mark.integration
def test_credentials_never_appear_in_repr_or_logs(s3_server, caplog):
    cfg = s3_storage_config(s3_server)
    st = Storage(cfg)
    with caplog.at_level(logging.DEBUG):
        st.ensure_bucket()
        st.write_text("k.txt", "v")
        st.read_text("k.txt")
        with pytest.raises(FileNotFoundError) as missing:
            st.read_text("nope.txt")
        fs = st.arrow_filesystem()
        fs.get_file_info(st.arrow_path("k.txt"))
    shown = [repr(st), str(st), repr(cfg), str(cfg), repr(fs), str(missing.value),
             repr(st.client), str(config_from_dict({"storage": {
                 "root": cfg.root, "endpoint": s3_server,
                 "access_key_id": S3_TEST_ACCESS_KEY, "secret_access_key": S3_TEST_SECRET_KEY}
             }).to_data())]
    assert caplog.records, "expected debug logs from boto3 to check"
    for text in shown:
        assert S3_TEST_SECRET_KEY not in text and S3_TEST_ACCESS_KEY not in text, text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert S3_TEST_SECRET_KEY not in logged
    # the access key id is an identifier botocore's DEBUG request dump may carry in the
    # signature header; it must not appear at INFO or above
    assert not any(S3_TEST_ACCESS_KEY in r.getMessage() for r in caplog.records
                   if r.levelno >= logging.INFO)


@pytest.mark.integration
def test_wrong_credentials_fail_clearly_without_leaking(s3_server):
    # moto accepts any key; a missing bucket is the failure we can provoke here
    st = Storage(s3_storage_config(s3_server, bucket="modula-no-such-bucket"))
    with pytest.raises((StorageError, FileNotFoundError)) as exc:
        st.read_text("x")
    assert S3_TEST_SECRET_KEY not in str(exc.value)
