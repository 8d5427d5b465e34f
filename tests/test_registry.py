"""The expert registry on a local root and on S3 (moto on loopback): versions, content-addressed
blobs that stay byte-identical, atomic publishing, concurrent publishers, verified fetches."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modula.config import StorageConfig
from modula.infra.registry import (
    ExpertSpec,
    LocalModel,
    ModelNotFound,
    Registry,
    RegistryConflict,
    RegistryError,
)
from modula.infra.storage import Storage

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.integration)]
META = {"base_model": {"id": "builtin:tiny", "sha256": "ab" * 32}, "variant": "res",
        "ranks": {"universal": 16, "domain": 8}}


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(StorageConfig(root=str(tmp_path / "store")))
    return request.getfixturevalue("s3_storage")


@pytest.fixture()
def registry(storage) -> Registry:
    return Registry(storage)


def expert_dir(path: Path, experts: dict[str, bytes]) -> Path:
    """A folder in the model engineer's format: one safetensors per expert + manifest.json."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    files = {}
    for name, body in experts.items():
        (path / f"{name}.safetensors").write_bytes(body)
        files[f"{name}.safetensors"] = hashlib.sha256(body).hexdigest()
    domains = [n for n in experts if n not in ("universal", "router")]
    (path / "manifest.json").write_text(json.dumps(
        {"base_model": "builtin:tiny", "variant": "res", "domains": domains, "files": files}))
    return path


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


V1 = {"universal": b"U" * 4000, "math": b"M" * 3000, "code": b"C" * 3000, "router": b"R1" * 500}


def test_publish_show_list_fetch(registry, tmp_path):
    assert registry.list_models() == [] and registry.latest_version("tiny") is None
    with pytest.raises(ModelNotFound):
        registry.show("tiny")
    src = expert_dir(tmp_path / "v1", V1)
    mv = registry.publish("tiny", src, META, experts={
        "universal": ExpertSpec("universal.safetensors", training={"lr": 1e-3, "steps": 200},
                                metrics={"loss": 1.25}),
        "math": {"file": "math.safetensors", "metrics": {"exact_match": 0.5}},
        "code": ExpertSpec("code.safetensors"),
        "router": ExpertSpec("router.safetensors", kind="router"),
    })
    assert mv.version == 1 and mv.parent is None
    assert registry.list_models() == ["tiny"] and registry.list_versions("tiny") == [1]
    assert registry.latest_version("tiny") == 1
    shown = registry.show("tiny")
    assert shown == mv and registry.show("tiny", 1) == mv
    assert shown.base_model.id == "builtin:tiny" and shown.base_model.sha256 == "ab" * 32
    assert shown.variant == "res" and shown.metadata == {"ranks": {"universal": 16, "domain": 8}}
    assert {n: e.kind for n, e in shown.experts.items()} == {
        "universal": "universal", "math": "domain", "code": "domain", "router": "router"}
    assert shown.domains() == ["math", "code"]
    u = shown.experts["universal"]
    assert (u.file, u.sha256, u.size, u.version) == ("universal.safetensors", sha(V1["universal"]),
                                                     4000, 1)
    assert u.training == {"lr": 1e-3, "steps": 200} and u.metrics == {"loss": 1.25}
    assert shown.experts["math"].metrics == {"exact_match": 0.5}
    assert set(shown.files) == {*(f"{n}.safetensors" for n in V1), "manifest.json"}

    local = registry.fetch("tiny", dest=tmp_path / "got")
    assert local.version == 1 and sorted(local.downloaded) == sorted(shown.files)
    for name, body in V1.items():
        assert local.expert_path(name).read_bytes() == body
    assert (local.path / "manifest.json").read_bytes() == (src / "manifest.json").read_bytes()
    assert LocalModel.open(local.path).manifest == mv
    with pytest.raises(ModelNotFound, match="no version 7"):
        registry.show("tiny", 7)


def test_experts_guessed_from_file_names(registry, tmp_path):
    src = expert_dir(tmp_path / "m", {"universal": b"u", "domain-math": b"m", "router": b"r"})
    mv = registry.publish("guess", src, {"base_model_id": "hf/llama", "variant": "flan"})
    assert {n: e.kind for n, e in mv.experts.items()} == {
        "universal": "universal", "math": "domain", "router": "router"}
    assert mv.base_model.id == "hf/llama" and mv.base_model.sha256 is None


def test_add_domain_keeps_old_experts_byte_identical_and_uploads_only_changes(
        registry, storage, tmp_path, monkeypatch):
    src = expert_dir(tmp_path / "m", V1)
    v1 = registry.publish("tiny", src, META)
    uploads: list[str] = []
    real_upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file",
                        lambda local, key: (uploads.append(Path(local).name), real_upload(local, key)))
    v2_files = {**V1, "headlines": b"H" * 3000, "router": b"R2" * 600}
    expert_dir(src, v2_files)
    v2 = registry.publish("tiny", src, META, base_version=1)
    assert v2.version == 2 and v2.parent == 1 and registry.latest_version("tiny") == 2
    # only the new expert, the retrained router and the model's own manifest went up
    assert sorted(uploads) == ["headlines.safetensors", "manifest.json", "router.safetensors"]
    for name in ("universal", "math", "code"):
        old, new = v1.experts[name], v2.experts[name]
        assert (new.sha256, new.size, new.version) == (old.sha256, old.size, 1)
    assert v2.experts["headlines"].version == 2 and v2.experts["router"].version == 2
    assert v2.experts["router"].sha256 != v1.experts["router"].sha256
    # both versions fetch, and the old experts are the same bytes in both
    a = registry.fetch("tiny", 1, tmp_path / "a")
    b = registry.fetch("tiny", 2, tmp_path / "b")
    for name in ("universal", "math", "code"):
        assert sha(a.expert_path(name).read_bytes()) == sha(b.expert_path(name).read_bytes()) \
            == sha(V1[name])
    assert not (a.path / "headlines.safetensors").exists()
    assert b.expert_path("router").read_bytes() == b"R2" * 600
    # re-fetching another version into a fetched folder: only changed files move, stale go
    again = registry.fetch("tiny", 1, tmp_path / "b")
    assert sorted(again.downloaded) == ["manifest.json", "router.safetensors"]
    assert not (tmp_path / "b" / "headlines.safetensors").exists()
    assert again.expert_path("router").read_bytes() == V1["router"]


@pytest.mark.parametrize("crash_at", ["upload", "blobs", "manifest"])
def test_crash_mid_publish_leaves_the_old_version_latest(registry, storage, tmp_path,
                                                         monkeypatch, crash_at):
    src = expert_dir(tmp_path / "m", V1)
    registry.publish("tiny", src, META)
    expert_dir(src, {**V1, "headlines": b"H" * 100, "universal": b"U2" * 10})

    class Crash(Exception):
        pass

    if crash_at == "upload":  # dies after the first uploaded file
        real, calls = storage.upload_file, []

        def flaky(local, key):
            if calls:
                raise Crash()
            calls.append(key)
            real(local, key)
        monkeypatch.setattr(storage, "upload_file", flaky)
    else:  # dies after all blobs / after the version's manifest, before the pointer moves
        def hook(step):
            if step == crash_at:
                raise Crash()
        registry._hook = hook
    with pytest.raises(Crash):
        registry.publish("tiny", src, META)
    monkeypatch.undo()
    registry._hook = None

    reader = Registry(storage)
    assert reader.latest_version("tiny") == 1
    mv = reader.show("tiny")
    assert mv.version == 1 and "headlines" not in mv.experts
    got = reader.fetch("tiny", dest=tmp_path / "read")
    assert got.expert_path("universal").read_bytes() == V1["universal"]
    # the next publish succeeds and is complete
    nxt = registry.publish("tiny", src, META)
    assert reader.latest_version("tiny") == nxt.version > 1
    assert reader.fetch("tiny", dest=tmp_path / "read2").expert_path("headlines").read_bytes() \
        == b"H" * 100


def test_racing_publishers_never_share_a_version_number(registry, storage, tmp_path):
    """Publisher A picks its number; B publishes completely before A claims it; A must not
    overwrite B's version: it takes the next number."""
    a_dir = expert_dir(tmp_path / "a", {"universal": b"A" * 10})
    b_dir = expert_dir(tmp_path / "b", {"universal": b"B" * 10})
    other = Registry(storage)
    fired = []

    def hook(step):
        if step == "number" and not fired:
            fired.append(other.publish("tiny", b_dir, {"who": "b"}))
    registry._hook = hook
    a = registry.publish("tiny", a_dir, {"who": "a"})
    b = fired[0]
    assert (b.version, a.version) == (1, 2) and a.parent == 1
    assert registry.latest_version("tiny") == 2
    assert registry.show("tiny", 1).metadata == {"who": "b"}
    assert registry.show("tiny", 2).metadata == {"who": "a"}
    assert registry.fetch("tiny", 1, tmp_path / "f1").expert_path("universal").read_bytes() \
        == b"B" * 10


def test_publisher_on_a_stale_base_fails_clearly(registry, storage, tmp_path):
    src = expert_dir(tmp_path / "m", V1)
    registry.publish("tiny", src, META)
    other = Registry(storage)

    def hook(step):
        if step == "manifest":  # A holds version 2 but has not moved the pointer yet
            other.publish("tiny", expert_dir(tmp_path / "o", {"universal": b"O"}), {})
    registry._hook = hook
    with pytest.raises(RegistryConflict, match="was published"):
        registry.publish("tiny", expert_dir(tmp_path / "n", {**V1, "new": b"N"}), META,
                         base_version=1)
    assert registry.latest_version("tiny") == 3 and registry.list_versions("tiny") == [1, 3]
    registry._hook = None
    with pytest.raises(RegistryConflict, match="latest is 3"):
        registry.publish("tiny", src, META, base_version=1)


def test_concurrent_threads_publish_distinct_versions(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path / "store")))
    dirs = [expert_dir(tmp_path / f"d{i}", {"universal": bytes([i]) * 50}) for i in range(4)]
    barrier = threading.Barrier(4)
    results, errors = {}, []

    def work(i):
        reg = Registry(storage)
        reg._hook = lambda step: barrier.wait() if step == "blobs" else None
        try:
            results[i] = reg.publish("tiny", dirs[i], {"who": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.version for r in results.values()) == [1, 2, 3, 4]
    reg = Registry(storage)
    assert reg.latest_version("tiny") == 4
    for i, r in results.items():
        assert reg.show("tiny", r.version).metadata == {"who": i}
        got = reg.fetch("tiny", r.version, tmp_path / f"out{i}")
        assert got.expert_path("universal").read_bytes() == bytes([i]) * 50


# ------------------------------------------------------------------ races, with a reader


@pytest.fixture(params=BACKENDS)
def race_storage(request, tmp_path) -> Storage:
    """Local storage, or S3 on loopback with the conditional writes AWS S3 guarantees (moto's
    own are not atomic under concurrency: test_storage.py shows it)."""
    if request.param == "local":
        return Storage(StorageConfig(root=str(tmp_path / "store")))
    request.getfixturevalue("s3_atomic_conditional_writes")
    return request.getfixturevalue("s3_storage")


class Reader(threading.Thread):
    """Polls ``show()`` and ``fetch()`` of the latest version until stopped; records every
    version it saw and anything that was not a complete, consistent version."""

    def __init__(self, storage: Storage, dest: Path, contents: dict[str, dict[str, bytes]]):
        super().__init__()
        self.registry, self.dest, self.contents = Registry(storage), dest, contents
        self.stop, self.seen, self.problems = threading.Event(), [], []

    def run(self) -> None:
        i, last = 0, False
        while not last:
            last = self.stop.is_set()  # one more read once the publishers are done
            i += 1
            try:
                mv = self.registry.show("tiny")
                if self.seen and mv.version < self.seen[-1]:
                    self.problems.append(f"LATEST went back: {self.seen[-1]} -> {mv.version}")
                self.seen.append(mv.version)
                got = self.registry.fetch("tiny", mv.version, self.dest / f"r{i}")
                want = self.contents[mv.metadata["who"]]
                files = {p.name[:-len(".safetensors")]: p.read_bytes()
                         for p in got.path.glob("*.safetensors")}
                if files != want:
                    self.problems.append(f"v{mv.version} ({mv.metadata['who']}): files {sorted(files)}"
                                         f" differ from what was published")
            except Exception as exc:  # noqa: BLE001 - a torn read is any failure at all
                self.problems.append(f"{type(exc).__name__}: {exc}")


def _race_publishes(storage: Storage, tmp_path: Path, jobs: dict[str, dict],
                    contents: dict[str, dict[str, bytes]]) -> tuple[dict, dict, Reader]:
    """Run every job's publish in its own thread, all claiming a version number at once (a
    barrier at the "number" step), with a reader polling throughout. Returns (versions of the
    publishes that succeeded, errors of the others, the reader)."""
    barrier = threading.Barrier(len(jobs), timeout=30)
    reader = Reader(storage, tmp_path / "reader", contents)
    done, failed = {}, {}

    def publish(who: str, job: dict) -> None:
        reg = Registry(storage)
        first = []

        def hook(step: str) -> None:
            if step == "number" and not first:  # every publisher has picked the same number
                first.append(step)
                barrier.wait()
        reg._hook = hook
        try:
            done[who] = reg.publish("tiny", expert_dir(tmp_path / who, contents[who]),
                                    {"who": who}, base_version=job.get("base"))
        except RegistryConflict as exc:
            failed[who] = exc

    threads = [threading.Thread(target=publish, args=(w, j)) for w, j in jobs.items()]
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.stop.set()
    reader.join()
    return done, failed, reader


@pytest.mark.parametrize("round_", range(3))
def test_racing_publishes_each_get_one_version_and_readers_never_see_a_torn_one(
        race_storage, tmp_path, round_):
    contents = {"v1": V1,
                "a": {**V1, "universal": b"A" * 4000},
                "b": {**V1, "universal": b"B" * 4000, "router": b"RB" * 500}}
    first = Registry(race_storage).publish("tiny", expert_dir(tmp_path / "v1", V1), {"who": "v1"})
    done, failed, reader = _race_publishes(race_storage, tmp_path, {"a": {}, "b": {}}, contents)
    assert not failed and sorted(mv.version for mv in done.values()) == [2, 3]
    reg = Registry(race_storage)
    assert reg.list_versions("tiny") == [1, 2, 3] and reg.latest_version("tiny") == 3
    for who, mv in done.items():  # each version holds exactly its publisher's files
        shown = reg.show("tiny", mv.version)
        assert shown.publish_id == mv.publish_id and shown.metadata == {"who": who}
        files = reg.fetch("tiny", mv.version, tmp_path / f"check-{who}").path
        assert {p.name: p.read_bytes() for p in files.glob("*.safetensors")} == {
            f"{n}.safetensors": b for n, b in contents[who].items()}
    assert {mv.parent for mv in done.values()} <= {first.version, 2}
    assert not reader.problems, reader.problems
    assert reader.seen and reader.seen[-1] == 3


@pytest.mark.parametrize("round_", range(3))
def test_racing_add_domains_on_one_base_one_wins_the_other_is_told(race_storage, tmp_path,
                                                                    round_):
    contents = {"v1": V1,
                "geo": {**V1, "geo": b"G" * 2000, "router": b"RG" * 500},
                "law": {**V1, "law": b"L" * 2000, "router": b"RL" * 500}}
    Registry(race_storage).publish("tiny", expert_dir(tmp_path / "v1", V1), {"who": "v1"})
    done, failed, reader = _race_publishes(
        race_storage, tmp_path, {"geo": {"base": 1}, "law": {"base": 1}}, contents)
    assert len(done) == 1 and len(failed) == 1, (done, failed)
    (winner, mv), (loser, err) = next(iter(done.items())), next(iter(failed.items()))
    assert "was published" in str(err) or "latest is" in str(err)
    reg = Registry(race_storage)
    assert reg.latest_version("tiny") == mv.version and mv.parent == 1
    # the loser left no version behind: only the base and the winner exist
    assert reg.list_versions("tiny") == [1, mv.version]
    assert set(reg.show("tiny").experts) == {*V1, winner}
    assert not reader.problems, reader.problems
    assert set(reader.seen) <= {1, mv.version} and reader.seen[-1] == mv.version
    # the loser redoes its add-domain on the new latest: it gets the next version
    again = reg.publish("tiny", expert_dir(tmp_path / f"{loser}-again", {
        **contents[winner], loser: contents[loser][loser]}), {"who": "again"},
        base_version=mv.version)
    assert again.version == mv.version + 1 and set(again.experts) == {*V1, winner, loser}


def test_missing_or_corrupt_files_fail_fetch_clearly(registry, storage, tmp_path):
    mv = registry.publish("tiny", expert_dir(tmp_path / "m", V1), META)
    math_blob = f"registry/tiny/blobs/{mv.experts['math'].sha256}"
    storage.write_bytes(math_blob, b"M" * 2999 + b"X")  # same size, other bytes
    with pytest.raises(RegistryError, match=r"'math.safetensors' is corrupt"):
        registry.fetch("tiny", dest=tmp_path / "c")
    with pytest.raises(RegistryError, match="did not finish"):
        LocalModel.open(tmp_path / "c")
    assert registry.verify("tiny") == [f"math.safetensors: corrupt ({storage.uri(math_blob)})"]
    storage.delete(math_blob)
    with pytest.raises(RegistryError, match=r"'math.safetensors' is missing"):
        registry.fetch("tiny", dest=tmp_path / "c")  # a half-fetched folder can be reused
    with pytest.raises(ModelNotFound):
        registry.fetch("nope", dest=tmp_path / "n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("do not delete")
    with pytest.raises(RegistryError, match="not empty"):
        registry.fetch("tiny", dest=foreign)
    assert (foreign / "mine.txt").read_text() == "do not delete"


def test_bad_manifests_pointers_and_inputs(registry, storage, tmp_path):
    src = expert_dir(tmp_path / "m", V1)
    with pytest.raises(RegistryError, match="not in the folder"):
        registry.publish("tiny", src, META, experts={"x": ExpertSpec("absent.safetensors")})
    with pytest.raises(RegistryError, match="JSON"):
        registry.publish("tiny", src, {"bad": object()})
    with pytest.raises(RegistryError, match="model name"):
        registry.publish("../evil", src, META)
    assert storage.list() == []  # nothing written by the refused publishes
    mv = registry.publish("tiny", src, META)
    key = f"registry/tiny/versions/{mv.version}/manifest.json"
    good = storage.read_text(key)
    storage.write_text(key, "{not json")
    with pytest.raises(RegistryError, match="not JSON"):
        registry.show("tiny")
    evil = json.loads(good)
    evil["files"]["../../outside"] = evil["files"].pop("manifest.json")
    storage.write_text(key, json.dumps(evil))
    with pytest.raises(RegistryError, match="relative path"):
        registry.fetch("tiny", dest=tmp_path / "x")
    assert not (tmp_path / "outside").exists()
    storage.write_text(key, good)
    storage.write_text("registry/tiny/LATEST", "garbage")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.latest_version("tiny")


def test_registry_cli_list_and_show(tmp_path, monkeypatch):
    from modula.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    root = tmp_path / "store"
    reg = Registry(Storage(StorageConfig(root=str(root))))
    src = expert_dir(tmp_path / "m", V1)
    reg.publish("tiny-res", src, META, experts={
        "universal": ExpertSpec("universal.safetensors", metrics={"loss": 1.5}),
        "math": ExpertSpec("math.safetensors"), "router": ExpertSpec("router.safetensors")})
    expert_dir(src, {**V1, "units": b"u" * 10})
    reg.publish("tiny-res", src, META)
    runner = CliRunner()
    sets = ["--set", f"storage.root={root}"]
    res = runner.invoke(app, ["registry", "list", *sets])
    assert res.exit_code == 0, res.output
    assert "tiny-res" in res.output and "builtin:tiny" in res.output
    row = next(line for line in res.output.splitlines() if "tiny-res" in line)
    assert "│ 2 " in row and "res" in row  # latest 2, two versions
    res = runner.invoke(app, ["registry", "show", "tiny-res", "--version", "1", *sets])
    assert res.exit_code == 0, res.output
    assert "universal" in res.output and "loss=1.5" in res.output and "latest: 2" in res.output
    assert "units" not in res.output
    res = runner.invoke(app, ["registry", "show", "tiny-res", "--json", *sets])
    assert res.exit_code == 0 and json.loads(res.output)["experts"]["units"]["version"] == 2
    res = runner.invoke(app, ["registry", "show", "nope", *sets])
    assert res.exit_code == 1 and "no published version" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["registry", "list", "--set", f"storage.root={tmp_path / 'empty'}"])
    assert res.exit_code == 0 and "no models" in res.output


def test_registry_pull_is_a_checked_copy(tmp_path):
    """``modula registry pull MODEL [--version V] DIR``: every file of the version, each
    sha256 checked; a corrupt blob or a foreign folder is an error, not a copy."""
    from modula.cli import app

    root = tmp_path / "store"
    reg = Registry(Storage(StorageConfig(root=str(root))))
    v1 = reg.publish("tiny", expert_dir(tmp_path / "e1", {"universal": b"u1", "math": b"m1"}),
                     metadata=META)
    reg.publish("tiny", expert_dir(tmp_path / "e2", {"universal": b"u1", "math": b"m2"}),
                metadata=META)
    runner = CliRunner()
    sets = ["--set", f"storage.root={root}"]
    out = tmp_path / "pulled"
    res = runner.invoke(app, ["registry", "pull", "tiny", str(out), "--version", "1", *sets])
    assert res.exit_code == 0, res.output
    assert (out / "math.safetensors").read_bytes() == b"m1"
    assert LocalModel.open(out).version == v1.version
    assert "sha256 verified" in res.output
    res = runner.invoke(app, ["registry", "pull", "tiny", str(out), *sets])  # latest, same dir
    assert res.exit_code == 0 and (out / "math.safetensors").read_bytes() == b"m2"
    # a corrupt blob: the pull fails naming the file, nothing half-copied is taken as done
    (root / "registry" / "tiny" / "blobs" / sha(b"m2")).write_bytes(b"tampered")
    res = runner.invoke(app, ["registry", "pull", "tiny", str(tmp_path / "bad"), *sets])
    assert res.exit_code == 1 and "corrupt" in res.output and "Traceback" not in res.output
    with pytest.raises(RegistryError, match="did not finish"):
        LocalModel.open(tmp_path / "bad")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["registry", "pull", "tiny", str(foreign), "--version", "1", *sets])
    assert res.exit_code == 1 and "not empty" in res.output
    assert (foreign / "notes.txt").read_text() == "mine"
