"""The expert registry: versioned, content-addressed model manifests under ``storage.root``.

Layout (keys relative to the storage root)::

    registry/<model>/blobs/<sha256>                 file bodies, content-addressed, immutable
    registry/<model>/versions/<N>/manifest.json     one version: every file and expert (JSON)
    registry/<model>/LATEST                         the pointer: the number of the latest version

A version is published in three steps: (1) upload the blobs that are not there yet (a file that
did not change between versions is neither uploaded again nor copied: both manifests name the
same blob, so it stays byte-identical); (2) claim the next version number by *creating* its
manifest (a create-only write: of two publishers racing for one number exactly one wins, the
other takes the next number, or fails with :class:`RegistryConflict` when it asked to build on a
version that is no longer the latest); (3) move the pointer with a compare-and-swap. A reader
follows the pointer, so it sees the old complete version or the new complete one, never a part.
A publish that dies before step 3 leaves the pointer on the old version (and at most some
unreferenced blobs, or a complete version that was never promoted).

The registry knows nothing of the model: it records a folder of files, which of them are
experts (universal, each domain, router) with their training config and metrics, and whatever
metadata the caller gives (base model id and hash, variant, ranks ...). Fetching checks the
sha256 of every file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from modula.errors import ModulaError
from modula.infra.files import sha256_file
from modula.infra.layout import MODEL_NAME_RE, REGISTRY, cache_dir
from modula.infra.storage import Storage, StorageError

__all__ = [
    "BaseModelRef",
    "ExpertEntry",
    "ExpertSpec",
    "FileEntry",
    "LocalModel",
    "ModelNotFound",
    "ModelVersion",
    "Registry",
    "RegistryConflict",
    "RegistryError",
]

FORMAT = "modula-registry/1"
FETCH_MARKER = ".modula-registry.json"  # written into a fetched folder: which version it holds
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(ModulaError):
    """A registry operation failed: missing or corrupt file, bad manifest, unknown model."""


class ModelNotFound(RegistryError, LookupError):
    """The model, or the requested version of it, is not in the registry."""


class RegistryConflict(RegistryError):
    """Another publisher changed the model first (see ``base_version`` of :meth:`Registry.publish`)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_rel_path(path: str) -> str:
    """A file path inside a model folder: relative, '/'-separated, never leaving the folder."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in path:
        raise RegistryError(f"file path {path!r} is not a plain relative path")
    return p.as_posix()


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} is not JSON-serialisable: {exc}") from None


# -------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its path in the model folder, sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BaseModelRef:
    """The frozen base model the experts were trained on."""

    id: str
    sha256: str | None = None


@dataclass(frozen=True)
class ExpertSpec:
    """What a publisher says about one expert (``publish(experts={name: ExpertSpec(...)})``)."""

    file: str
    kind: str | None = None  # universal | domain | router (guessed from the name when None)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertEntry:
    """One expert of a version. `version` is the version that introduced this exact file
    content: an expert carried over unchanged keeps the version it was first published in."""

    name: str
    kind: str
    file: str
    sha256: str
    size: int
    version: int
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersion:
    """The manifest of one published version of a model."""

    model: str
    version: int
    created_at: str
    files: dict[str, FileEntry]
    experts: dict[str, ExpertEntry]
    base_model: BaseModelRef | None = None
    variant: str | None = None
    parent: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    publish_id: str = ""
    publisher: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def domains(self) -> list[str]:
        return [e.name for e in self.experts.values() if e.kind == "domain"]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {"format": FORMAT, **d}
        d["files"] = {p: {"sha256": f.sha256, "size": f.size} for p, f in self.files.items()}
        d["experts"] = {
            n: {k: v for k, v in dataclasses.asdict(e).items() if k != "name"}
            for n, e in self.experts.items()
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelVersion:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r} (expected {FORMAT!r})")
            files = {
                _check_rel_path(p): FileEntry(p, str(f["sha256"]), int(f["size"]))
                for p, f in d["files"].items()
            }
            for f in files.values():
                if not _SHA256.match(f.sha256):
                    raise ValueError(f"file {f.path!r}: {f.sha256!r} is not a sha256")
            experts = {
                n: ExpertEntry(name=n, kind=str(e["kind"]), file=str(e["file"]),
                               sha256=str(e["sha256"]), size=int(e["size"]),
                               version=int(e["version"]), training=dict(e.get("training") or {}),
                               metrics=dict(e.get("metrics") or {}))
                for n, e in d["experts"].items()
            }
            for e in experts.values():
                if e.file not in files:
                    raise ValueError(f"expert {e.name!r} names file {e.file!r}, not in files")
            bm = d.get("base_model")
            return cls(
                model=str(d["model"]),
                version=int(d["version"]),
                created_at=str(d.get("created_at", "")),
                files=files,
                experts=experts,
                base_model=BaseModelRef(str(bm["id"]), bm.get("sha256")) if bm else None,
                variant=d.get("variant"),
                parent=d.get("parent"),
                metadata=dict(d.get("metadata") or {}),
                publish_id=str(d.get("publish_id", "")),
                publisher=str(d.get("publisher", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"malformed registry manifest: {exc!r}") from None


@dataclass(frozen=True)
class LocalModel:
    """A version fetched to a local folder, every file's sha256 checked."""

    path: Path
    manifest: ModelVersion
    downloaded: list[str]  # files fetched now (the others were already there, same sha256)

    @property
    def version(self) -> int:
        return self.manifest.version

    def file(self, name: str) -> Path:
        return self.path / name

    def expert_path(self, expert: str) -> Path:
        return self.path / self.manifest.experts[expert].file

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LocalModel:
        """A folder a complete :meth:`Registry.fetch` wrote (RegistryError otherwise)."""
        marker = Path(path) / FETCH_MARKER
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise RegistryError(f"{path} is not a folder fetched from the registry") from None
        if not data.get("complete"):
            raise RegistryError(f"{path}: the fetch into this folder did not finish")
        return cls(path=Path(path), manifest=ModelVersion.from_dict(data["manifest"]), downloaded=[])


def guess_expert(path: str) -> tuple[str, str]:
    """(name, kind) of an expert file from its path: ``universal.safetensors`` -> universal,
    ``router*.safetensors`` -> router, ``classifier.safetensors`` -> classifier (the request
    router), anything else a domain named by its stem (a leading ``domain-`` / ``domain_`` is
    dropped)."""
    stem = PurePosixPath(path).name.split(".", 1)[0]
    if stem in ("universal", "classifier"):
        return stem, stem
    if stem.startswith("router"):
        return stem, "router"
    for pre in ("domain-", "domain_", "domain."):
        if stem.startswith(pre) and len(stem) > len(pre):
            stem = stem[len(pre):]
            break
    return stem, "domain"


# -------------------------------------------------------------------------------------- registry


class Registry:
    """Publish, list, show and fetch versioned model folders under a storage root."""

    def __init__(self, storage: Storage, prefix: str = REGISTRY):
        self.storage = storage
        self.prefix = prefix.strip("/")
        # test hook: called between the steps of publish() with the step's name
        self._hook: Callable[[str], None] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> Registry:
        """From a ModulaConfig (or a StorageConfig)."""
        return cls(Storage(getattr(cfg, "storage", cfg)))

    def __repr__(self) -> str:
        return f"Registry({self.storage!r})"

    # ------------------------------------------------------------------ keys

    def _model_key(self, model: str) -> str:
        if not MODEL_NAME_RE.match(model or ""):
            raise RegistryError(
                f"model name {model!r} is not allowed (letters, digits, '.', '_', '-'; "
                "starting with a letter or digit)"
            )
        return f"{self.prefix}/{model}"

    def _blob_key(self, model: str, sha: str) -> str:
        return f"{self._model_key(model)}/blobs/{sha}"

    def _manifest_key(self, model: str, version: int) -> str:
        return f"{self._model_key(model)}/versions/{version}/manifest.json"

    def _pointer_key(self, model: str) -> str:
        return f"{self._model_key(model)}/LATEST"

    def _step(self, name: str) -> None:
        if self._hook is not None:
            self._hook(name)

    # ------------------------------------------------------------------ reading

    def list_models(self) -> list[str]:
        """Models with at least one published (promoted) version."""
        return [m for m in self.storage.list_dirs(self.prefix)
                if MODEL_NAME_RE.match(m) and self.storage.exists(self._pointer_key(m))]

    def latest_version(self, model: str) -> int | None:
        """The version the pointer names, or None if nothing is published. One small read:
        cheap enough for serving replicas to poll."""
        try:
            return self._read_pointer(model)[0]
        except FileNotFoundError:
            return None

    def _read_pointer(self, model: str) -> tuple[int, str]:
        raw, tag = self.storage.read_bytes_tagged(self._pointer_key(model))
        try:
            return int(raw.decode().strip()), tag
        except ValueError:
            raise RegistryError(
                f"registry pointer {self.storage.uri(self._pointer_key(model))} is corrupt: "
                f"{raw[:40]!r}"
            ) from None

    def list_versions(self, model: str) -> list[int]:
        """Every version with a complete manifest, ascending (one listing)."""
        base = f"{self._model_key(model)}/versions/"
        out = set()
        for key in self.storage.list(base):
            rest = key[len(base):] if key.startswith(base) else ""
            num, _, tail = rest.partition("/")
            if tail == "manifest.json" and num.isdigit():
                out.add(int(num))
        return sorted(out)

    def show(self, model: str, version: int | None = None) -> ModelVersion:
        """The manifest of `version` (default: the latest)."""
        if version is None:
            version = self.latest_version(model)
            if version is None:
                raise ModelNotFound(
                    f"model {model!r} has no published version in {self.storage.uri(self.prefix)}"
                )
        try:
            raw = self.storage.read_bytes(self._manifest_key(model, version))
        except FileNotFoundError:
            raise ModelNotFound(
                f"model {model!r} has no version {version} (versions: "
                f"{self.list_versions(model) or 'none'})"
            ) from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"manifest of {model!r} version {version} is not JSON: {exc}") from None
        mv = ModelVersion.from_dict(data)
        if mv.model != model or mv.version != version:
            raise RegistryError(
                f"manifest at {self._manifest_key(model, version)} says {mv.model!r} "
                f"version {mv.version}"
            )
        return mv

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        model: str,
        local_dir: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        experts: Mapping[str, ExpertSpec | Mapping[str, Any]] | None = None,
        *,
        base_version: int | None = None,
        max_attempts: int = 20,
    ) -> ModelVersion:
        """Publish every file of `local_dir` as the next version of `model`.

        `metadata`: free JSON; the keys ``base_model`` (an id, or ``{"id", "sha256"}``),
        ``base_model_id``, ``base_model_sha256`` and ``variant`` are lifted into typed fields.
        `experts`: name -> :class:`ExpertSpec` (or a mapping with its fields); None = every
        ``*.safetensors`` file is an expert, named and typed by :func:`guess_expert`.
        `base_version`: the version this one was built from; if the latest version is then no
        longer `base_version`, nothing is promoted and :class:`RegistryConflict` is raised
        (without it, a publisher that loses a race for a number simply takes the next one).
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise RegistryError(f"{root} is not a folder")
        files = self._scan(root)
        if not files:
            raise RegistryError(f"{root} holds no files to publish")
        specs = self._expert_specs(files, experts)
        meta = dict(_json_safe(dict(metadata or {}), "metadata"))
        base_model, variant = self._lift(meta)
        publish_id = uuid.uuid4().hex
        publisher = f"{socket.gethostname()}:{os.getpid()}"

        if base_version is not None and self.latest_version(model) != base_version:
            raise RegistryConflict(
                f"model {model!r}: publishing on version {base_version}, but the latest is "
                f"{self.latest_version(model)}"
            )

        # 1. blobs: content-addressed, uploaded only when missing
        self._upload_blobs(model, root, files)
        self._step("blobs")

        # 2. claim a version number by creating its manifest
        for _attempt in range(max_attempts):
            try:
                parent, pointer_tag = self._read_pointer(model)
            except FileNotFoundError:
                parent, pointer_tag = None, None
            if base_version is not None and parent != base_version:
                raise RegistryConflict(
                    f"model {model!r}: publishing on version {base_version}, but version "
                    f"{parent} was published meanwhile"
                )
            parent_mv = self.show(model, parent) if parent is not None else None
            version = max([*self.list_versions(model), parent or 0]) + 1
            self._step("number")
            mv = ModelVersion(
                model=model, version=version, created_at=_now(), files=files,
                experts=self._experts(specs, files, version, parent_mv),
                base_model=base_model, variant=variant, parent=parent, metadata=meta,
                publish_id=publish_id, publisher=publisher,
            )
            data = mv.to_json().encode()
            if self.storage.create_bytes(self._manifest_key(model, version), data) and \
                    self._owns(model, version, publish_id):
                break
        else:
            raise RegistryConflict(
                f"model {model!r}: could not claim a version number in {max_attempts} attempts "
                "(too many concurrent publishers)"
            )
        self._step("manifest")

        # 3. move the pointer (compare-and-swap; never backwards)
        self._move_pointer(model, version, parent, pointer_tag, base_version)
        self._step("pointer")
        return mv

    def _owns(self, model: str, version: int, publish_id: str) -> bool:
        # read back: guards against stores that ignore conditional writes
        try:
            data = json.loads(self.storage.read_bytes(self._manifest_key(model, version)))
        except (FileNotFoundError, ValueError):
            return False
        return data.get("publish_id") == publish_id

    def _move_pointer(self, model: str, version: int, parent: int | None, tag: str | None,
                      base_version: int | None) -> None:
        key = self._pointer_key(model)
        payload = f"{version}\n".encode()
        for _ in range(100):
            if self.storage.replace_bytes(key, payload, tag):
                return
            try:
                current, tag = self._read_pointer(model)
            except FileNotFoundError:
                current, tag = None, None
            if base_version is not None and current != base_version:
                # someone promoted another version since we checked: do not clobber it
                self.storage.delete(self._manifest_key(model, version))
                raise RegistryConflict(
                    f"model {model!r}: version {current} was published while version {version} "
                    f"was being published on {base_version}; {version} was not promoted"
                )
            if current is not None and current >= version:
                return  # a newer version is already the latest: leave it
        raise RegistryConflict(f"model {model!r}: could not move the LATEST pointer to {version}")

    @staticmethod
    def _scan(root: Path) -> dict[str, FileEntry]:
        files: dict[str, FileEntry] = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != FETCH_MARKER:
                rel = _check_rel_path(p.relative_to(root).as_posix())
                files[rel] = FileEntry(rel, sha256_file(p), p.stat().st_size)
        return files

    @staticmethod
    def _expert_specs(files: Mapping[str, FileEntry],
                      experts: Mapping[str, ExpertSpec | Mapping[str, Any]] | None
                      ) -> dict[str, ExpertSpec]:
        if experts is None:
            out: dict[str, ExpertSpec] = {}
            for path in files:
                if path.endswith(".safetensors"):
                    name, kind = guess_expert(path)
                    if name in out:
                        raise RegistryError(
                            f"two files make an expert named {name!r}: {out[name].file!r} and "
                            f"{path!r}; pass experts= explicitly"
                        )
                    out[name] = ExpertSpec(file=path, kind=kind)
            return out
        out = {}
        for name, spec in experts.items():
            if not isinstance(spec, ExpertSpec):
                try:
                    spec = ExpertSpec(**dict(spec))
                except TypeError as exc:
                    raise RegistryError(f"expert {name!r}: {exc}") from None
            file = _check_rel_path(spec.file)
            if file not in files:
                raise RegistryError(f"expert {name!r}: file {spec.file!r} is not in the folder")
            kind = spec.kind or guess_expert(name)[1]
            out[name] = ExpertSpec(
                file=file, kind=kind,
                training=_json_safe(dict(spec.training), f"expert {name!r} training"),
                metrics=_json_safe(dict(spec.metrics), f"expert {name!r} metrics"),
            )
        return out

    @staticmethod
    def _lift(meta: dict[str, Any]) -> tuple[BaseModelRef | None, str | None]:
        bm = meta.pop("base_model", None)
        bm_id = meta.pop("base_model_id", None)
        bm_sha = meta.pop("base_model_sha256", None) or meta.pop("base_model_hash", None)
        if isinstance(bm, Mapping):
            bm_id = bm_id or bm.get("id")
            bm_sha = bm_sha or bm.get("sha256") or bm.get("hash")
        elif bm is not None:
            bm_id = bm_id or str(bm)
        variant = meta.pop("variant", None)
        base = BaseModelRef(str(bm_id), str(bm_sha) if bm_sha else None) if bm_id else None
        return base, (str(variant) if variant is not None else None)

    @staticmethod
    def _experts(specs: Mapping[str, ExpertSpec], files: Mapping[str, FileEntry], version: int,
                 parent: ModelVersion | None) -> dict[str, ExpertEntry]:
        out = {}
        for name, spec in specs.items():
            f = files[spec.file]
            prev = parent.experts.get(name) if parent else None
            since = prev.version if prev is not None and prev.sha256 == f.sha256 else version
            out[name] = ExpertEntry(name=name, kind=spec.kind or "domain", file=f.path,
                                    sha256=f.sha256, size=f.size, version=since,
                                    training=dict(spec.training), metrics=dict(spec.metrics))
        return out

    def _upload_blobs(self, model: str, root: Path, files: Mapping[str, FileEntry]) -> list[str]:
        uploaded = []
        for sha, entry in {f.sha256: f for f in files.values()}.items():
            key = self._blob_key(model, sha)
            try:
                if self.storage.size(key) == entry.size:
                    continue  # already there (content-addressed): not uploaded again
            except FileNotFoundError:
                pass
            self.storage.upload_file(root / entry.path, key)
            uploaded.append(entry.path)
        return uploaded

    # ------------------------------------------------------------------ fetching

    def fetch(self, model: str, version: int | None = None,
              dest: str | os.PathLike[str] | None = None) -> LocalModel:
        """Download a version (default: the latest) into `dest` and check every sha256.

        `dest` must be empty, missing, or a folder an earlier fetch wrote (then files with the
        right sha256 are kept and files of other versions removed). Default dest: a per-version
        folder under the system temporary directory. A missing or corrupt file raises
        :class:`RegistryError` naming it.
        """
        mv = self.show(model, version)
        if dest is None:  # per storage root, model and version
            root_id = hashlib.sha256(self.storage.uri(self.prefix).encode()).hexdigest()[:10]
            dest = cache_dir("registry", root_id, model, f"v{mv.version}")
        out = Path(dest)
        marker = out / FETCH_MARKER
        if out.exists() and any(out.iterdir()) and not marker.is_file():
            raise RegistryError(
                f"{out} is not empty and was not written by a registry fetch; "
                "give an empty or new folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        # the marker says "a registry fetch owns this folder"; complete only once all is checked
        marker.write_text(json.dumps({"complete": False, "model": model, "version": mv.version}))
        downloaded = []
        for path, f in mv.files.items():
            target = out / path
            if target.is_file() and target.stat().st_size == f.size and sha256_file(target) == f.sha256:
                continue
            self._download_verified(model, mv.version, f, target)
            downloaded.append(path)
        for p in sorted(out.rglob("*"), reverse=True):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and rel not in mv.files and rel != FETCH_MARKER and not (
                    p.name.startswith(".") and p.name.endswith(".tmp")):  # another fetch's
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        marker.write_text(json.dumps({"complete": True, "manifest": mv.to_dict()}, indent=2))
        return LocalModel(path=out, manifest=mv, downloaded=downloaded)

    def _download_verified(self, model: str, version: int, f: FileEntry, target: Path) -> None:
        key = self._blob_key(model, f.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                self.storage.download_file(key, tmp)
            except FileNotFoundError:
                raise RegistryError(
                    f"model {model!r} version {version}: file {f.path!r} is missing from storage "
                    f"({self.storage.uri(key)})"
                ) from None
            except StorageError as exc:
                raise RegistryError(
                    f"model {model!r} version {version}: cannot read {f.path!r}: {exc}"
                ) from None
            got = sha256_file(tmp)
            if got != f.sha256 or tmp.stat().st_size != f.size:
                raise RegistryError(
                    f"model {model!r} version {version}: file {f.path!r} is corrupt "
                    f"(sha256 {got[:16]}..., {tmp.stat().st_size} bytes; the manifest says "
                    f"{f.sha256[:16]}..., {f.size} bytes) at {self.storage.uri(key)}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, model: str, version: int | None = None) -> list[str]:
        """Problems with the stored files of a version (missing or wrong blobs); [] if none.
        Reads every blob; meant for audits, not for polling."""
        mv = self.show(model, version)
        problems = []
        for f in mv.files.values():
            key = self._blob_key(model, f.sha256)
            try:
                data = self.storage.read_bytes(key)
            except FileNotFoundError:
                problems.append(f"{f.path}: missing ({self.storage.uri(key)})")
                continue
            if hashlib.sha256(data).hexdigest() != f.sha256:
                problems.append(f"{f.path}: corrupt ({self.storage.uri(key)})")
        return problems

