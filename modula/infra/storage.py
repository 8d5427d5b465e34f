"""One view of ``storage.root``, local path or ``s3://bucket/prefix``.

``Storage(cfg)`` is a :class:`LocalStorage` (plain files) or an :class:`S3Storage` (boto3),
chosen once from the root, as ``pathlib.Path`` picks its flavour; both answer the same
methods with the same semantics (whole-object writes, create-only and compare-and-swap writes,
:class:`FileNotFoundError` for a missing object). Ray Train and Ray Data get a ``pyarrow.fs``
filesystem for the same root. Keys are always relative, '/'-separated paths under the root.
Credentials come from the config or the environment and are never logged or put in ``repr``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from modula.config.schema import StorageConfig
from modula.errors import ModulaError
from modula.infra.files import atomic_write, file_lock, write_temp_beside
from modula.infra.layout import scratch_dir

__all__ = ["LocalStorage", "S3Storage", "Storage", "StorageError"]


class StorageError(ModulaError, OSError):
    """A storage operation failed; the message names the key and the root."""


_MISSING = ("404", "NoSuchKey", "NotFound")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _skip_local(name: str) -> bool:
    """Temporary and lock files of the local backend are not objects."""
    return name.endswith(".tmp") or (name.startswith(".") and name.endswith(".lock"))


def _clean_key(key: str) -> str:
    parts = [p for p in PurePosixPath(key.replace("\\", "/")).parts if p not in ("", "/")]
    if any(p == ".." for p in parts):
        raise StorageError(f"key {key!r} leaves the storage root")
    return "/".join(parts)


class Storage:
    """The storage root of a config: read, write, list and copy objects by key.

    What both backends share lives here; each backend implements the object operations.
    """

    is_s3 = False

    def __new__(cls, cfg: StorageConfig) -> Storage:
        if cls is Storage:
            cls = S3Storage if cfg.is_s3 else LocalStorage
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[StorageConfig]:
        return (self.cfg,)

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self.bucket = ""
        self.prefix = ""
        self.local_root: Path | None = None

    def __repr__(self) -> str:
        return f"Storage({self.cfg.root!r})"

    # ---------------------------------------------------------------- shared

    def arrow_path(self, key: str = "") -> str:
        """The path of `key` inside :meth:`arrow_filesystem` (no scheme, as pyarrow wants)."""
        return self.uri(key)

    def _credentials(self) -> dict[str, str]:
        c = self.cfg
        if c.access_key_id is not None and c.secret_access_key is not None:
            return {
                "access_key": c.access_key_id.get_secret_value(),
                "secret_key": c.secret_access_key.get_secret_value(),
            }
        return {}

    @property
    def client(self) -> Any:
        """A boto3 S3 client for this root (S3 only)."""
        raise StorageError("a local storage root has no S3 client")

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def replace_bytes(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        """Compare-and-swap: write only if the object still has `expected_tag`.

        `expected_tag` comes from :meth:`read_bytes_tagged`; None means "only if the object
        does not exist". Returns False when another writer got there first. Locally an
        exclusive ``flock`` around read-compare-rename; on S3 a conditional PUT (``If-Match``).
        """
        if expected_tag is None:
            return self.create_bytes(key, data)
        return self._replace_if(key, data, expected_tag)

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`, sorted."""
        return sorted(self._iter_keys(_clean_key(prefix)))

    def upload_dir(self, local_dir: str | os.PathLike[str], key: str) -> list[str]:
        """Copy every file of a local folder under `key`; returns the keys written."""
        src = Path(local_dir)
        written = []
        for p in sorted(src.rglob("*")):
            if p.is_file():
                dest = f"{_clean_key(key)}/{p.relative_to(src).as_posix()}"
                self.upload_file(p, dest)
                written.append(dest)
        return written

    def download_dir(self, key: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy every object under `key` into a local folder; returns that folder."""
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        base = _clean_key(key)
        keys = self.list(base)
        if not keys:
            raise FileNotFoundError(f"{self.uri(base)} holds no files")
        for k in keys:
            rel = k[len(base):].lstrip("/") if base else k
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(k, out)
        return dest

    # ---------------------------------------------------------------- per backend

    def uri(self, key: str = "") -> str:
        """A full address: ``s3://bucket/prefix/key`` or an absolute local path."""
        raise NotImplementedError

    def arrow_filesystem(self) -> Any:
        """A pyarrow filesystem for Ray Train (``storage_filesystem``) and Ray Data."""
        raise NotImplementedError

    def ray_storage(self, key: str) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for ``ray.train.RunConfig`` under `key`."""
        raise NotImplementedError

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (S3), or the root directory (local)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        """The size in bytes of an object; FileNotFoundError if it does not exist."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole: a reader sees the old content or the new, never a part.

        Locally: write a temporary file beside it, then rename. S3 PUT is atomic per object.
        """
        raise NotImplementedError

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write an object only if `key` does not exist yet; False if it already did.

        The check and the write are one atomic step: of several writers racing for one key,
        exactly one gets True. Locally a hard link of a complete temporary file; on S3 a
        conditional PUT (``If-None-Match: *``).
        """
        raise NotImplementedError

    def read_bytes_tagged(self, key: str) -> tuple[bytes, str]:
        """An object's content and a tag of that content, for :meth:`replace_bytes`."""
        raise NotImplementedError

    def _replace_if(self, key: str, data: bytes, expected_tag: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix` (missing: nothing to do)."""
        raise NotImplementedError

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        raise NotImplementedError

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of `prefix`."""
        raise NotImplementedError

    def upload_file(self, local: str | os.PathLike[str], key: str) -> None:
        raise NotImplementedError

    def download_file(self, key: str, local: str | os.PathLike[str]) -> Path:
        """Copy one object to a local file (FileNotFoundError if it does not exist)."""
        raise NotImplementedError

    def local_dir(self, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local folder holding `key`: the folder itself locally, a downloaded copy on S3."""
        raise NotImplementedError


class LocalStorage(Storage):
    """A root on the local file system (or a shared one every node mounts)."""

    def __init__(self, cfg: StorageConfig):
        super().__init__(cfg)
        self.local_root = Path(cfg.root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return Path(self.uri(key))

    def _existing(self, key: str) -> Path:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
        return p

    def uri(self, key: str = "") -> str:
        key = _clean_key(key)
        assert self.local_root is not None
        return str(self.local_root / key) if key else str(self.local_root)

    def arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def ray_storage(self, key: str) -> tuple[str, Any]:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None

    def ensure_bucket(self) -> None:
        assert self.local_root is not None
        self.local_root.mkdir(parents=True, exist_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def create_bytes(self, key: str, data: bytes) -> bool:
        p = self._path(key)
        tmp = write_temp_beside(p, data)
        try:
            os.link(tmp, p)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network/FUSE filesystems)
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_bytes_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def _replace_if(self, key: str, data: bytes, expected_tag: str) -> bool:
        p = self._path(key)
        with file_lock(p.with_name(f".{p.name}.lock")):
            try:
                _, tag = self.read_bytes_tagged(key)
            except FileNotFoundError:
                return False
            if tag != expected_tag:
                return False
            self.write_bytes(key, data)
            return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.uri(prefix), ignore_errors=True)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        assert self.local_root is not None
        for p in base.rglob("*"):
            if p.is_file() and not _skip_local(p.name):
                yield p.relative_to(self.local_root).as_posix()

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self._path(_clean_key(prefix))
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def upload_file(self, local: str | os.PathLike[str], key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() == dest.resolve():
            return
        # a private temporary name: concurrent uploads of one key must not share it
        tmp = write_temp_beside(dest, b"")
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download_file(self, key: str, local: str | os.PathLike[str]) -> Path:
        out = Path(local)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._existing(key), out)
        return out

    def local_dir(self, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        p = self._path(key)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} does not exist")
        return p


class S3Storage(Storage):
    """A root in an S3 bucket (or an S3-compatible store at ``storage.endpoint``)."""

    is_s3 = True

    def __init__(self, cfg: StorageConfig):
        super().__init__(cfg)
        self.bucket = cfg.bucket or ""
        self.prefix = cfg.prefix.strip("/")
        self._client: Any = None

    def _s3_key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _fail(self, exc: Exception, key: str, verb: str = "read") -> Exception:
        """The error for a failed call on `key`: FileNotFoundError when it is missing."""
        if _error_code(exc) in _MISSING:
            return FileNotFoundError(f"{self.uri(key)} does not exist")
        return StorageError(f"cannot {verb} {self.uri(key)}: {_error_code(exc)}")

    def uri(self, key: str = "") -> str:
        k = self._s3_key(_clean_key(key))
        return f"s3://{self.bucket}/{k}" if k else f"s3://{self.bucket}"

    def arrow_path(self, key: str = "") -> str:
        return self.uri(key)[len("s3://"):]

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            creds = self._credentials()
            self._client = boto3.client(
                "s3",
                endpoint_url=self.cfg.endpoint,
                region_name=self.cfg.region,
                aws_access_key_id=creds.get("access_key"),
                aws_secret_access_key=creds.get("secret_key"),
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
        return self._client

    def arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        kw: dict[str, Any] = {"region": self.cfg.region, **self._credentials()}
        if self.cfg.endpoint:
            scheme, host = self.cfg.endpoint.split("://", 1)
            kw.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kw)

    def ray_storage(self, key: str) -> tuple[str, Any]:
        return self.arrow_path(key), self.arrow_filesystem()

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in (*_MISSING, "NoSuchBucket"):
                raise StorageError(
                    f"cannot use bucket s3://{self.bucket}: {_error_code(exc)}"
                ) from None
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if self.cfg.region and self.cfg.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
        try:
            self.client.create_bucket(**kw)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(
                    f"cannot create bucket s3://{self.bucket}: {_error_code(exc)}"
                ) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            return True
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return False
            raise StorageError(f"cannot stat {self.uri(key)}: {_error_code(exc)}") from None

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(
                self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))["ContentLength"]
            )
        except ClientError as exc:
            raise self._fail(exc, key, "stat") from None

    def read_bytes(self, key: str) -> bytes:
        return self.read_bytes_tagged(key)[0]

    def write_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
        except ClientError as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {_error_code(exc)}") from None

    def create_bytes(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, IfNoneMatch="*")

    def read_bytes_tagged(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))
            return resp["Body"].read(), str(resp["ETag"])
        except ClientError as exc:
            raise self._fail(exc, key) from None

    def _replace_if(self, key: str, data: bytes, expected_tag: str) -> bool:
        return self._put_if(key, data, IfMatch=expected_tag)

    def _put_if(self, key: str, data: bytes, **cond: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data, **cond)
            return True
        except ClientError as exc:
            code = _error_code(exc)
            # 412: the condition failed; 409: a concurrent conditional write won; 404: the
            # object named by If-Match is gone
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                        *_MISSING):
                return False
            raise StorageError(f"cannot write {self.uri(key)}: {code}") from None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key))

    def delete_prefix(self, prefix: str) -> None:
        for k in self.list(prefix):
            self.delete(k)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._s3_key(prefix)
        if full and not full.endswith("/"):
            full += "/"
        strip = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # "folder" marker objects
                    yield obj["Key"][len(strip):]

    def list_dirs(self, prefix: str = "") -> list[str]:
        full = self._s3_key(_clean_key(prefix))
        full = f"{full}/" if full else ""
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(full):].rstrip("/"))
        return sorted(names)

    def upload_file(self, local: str | os.PathLike[str], key: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(str(local), self.bucket, self._s3_key(key))
        except S3UploadFailedError as exc:
            raise StorageError(f"cannot upload to {self.uri(key)}: {exc}") from None

    def download_file(self, key: str, local: str | os.PathLike[str]) -> Path:
        from botocore.exceptions import ClientError

        out = Path(local)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._s3_key(key), str(out))
        except ClientError as exc:
            raise self._fail(exc, key) from None
        return out

    def local_dir(self, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        cache = Path(cache_dir) if cache_dir else scratch_dir("storage")
        return self.download_dir(key, cache)
