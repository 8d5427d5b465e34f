"""One view of ``storage.root``, local path or ``s3://bucket/prefix``.

Objects (small files, manifests, expert files) go through boto3 on S3 and plain files locally;
Ray Train and Ray Data get a ``pyarrow.fs`` filesystem for the same root. Keys are always
relative, '/'-separated paths under the root. Credentials come from the config or the
environment and are never logged or put in ``repr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from modula.config import StorageConfig

__all__ = ["Storage", "StorageError"]


class StorageError(OSError):
    """A storage operation failed; the message names the key and the root."""


_MISSING = ("404", "NoSuchKey", "NotFound")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _skip_local(name: str) -> bool:
    """Temporary and lock files of the local backend are not objects."""
    return name.endswith(".tmp") or (name.startswith(".") and name.endswith(".lock"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on a sidecar file, for local compare-and-swap."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_tmp(p: Path, data: bytes) -> str:
    """Write `data` to a fresh temporary file beside `p` (fsynced); returns its path."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _clean_key(key: str) -> str:
    parts = [p for p in PurePosixPath(key.replace("\\", "/")).parts if p not in ("", "/")]
    if any(p == ".." for p in parts):
        raise StorageError(f"key {key!r} leaves the storage root")
    return "/".join(parts)


class Storage:
    """The storage root of a config: read, write, list and copy objects by key."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self.is_s3 = cfg.is_s3
        if self.is_s3:
            self.bucket = cfg.bucket or ""
            self.prefix = cfg.prefix.strip("/")
            self.local_root: Path | None = None
        else:
            self.bucket = ""
            self.prefix = ""
            self.local_root = Path(cfg.root).expanduser().resolve()
        self._client: Any = None

    def __repr__(self) -> str:
        return f"Storage({self.cfg.root!r})"

    # ---------------------------------------------------------------- naming

    def _s3_key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def uri(self, key: str = "") -> str:
        """A full address: ``s3://bucket/prefix/key`` or an absolute local path."""
        key = _clean_key(key)
        if self.is_s3:
            k = self._s3_key(key)
            return f"s3://{self.bucket}/{k}" if k else f"s3://{self.bucket}"
        assert self.local_root is not None
        return str(self.local_root / key) if key else str(self.local_root)

    def arrow_path(self, key: str = "") -> str:
        """The path of `key` inside :meth:`arrow_filesystem` (no scheme, as pyarrow wants)."""
        if self.is_s3:
            return self.uri(key)[len("s3://"):]
        return self.uri(key)

    # ---------------------------------------------------------------- clients

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
        if not self.is_s3:
            raise StorageError("a local storage root has no S3 client")
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
        """A pyarrow filesystem for Ray Train (``storage_filesystem``) and Ray Data."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        kw: dict[str, Any] = {"region": self.cfg.region, **self._credentials()}
        if self.cfg.endpoint:
            scheme, host = self.cfg.endpoint.split("://", 1)
            kw.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kw)

    def ray_storage(self, key: str) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for ``ray.train.RunConfig`` under `key`."""
        if self.is_s3:
            return self.arrow_path(key), self.arrow_filesystem()
        path = Path(self.uri(key))
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None

    # ---------------------------------------------------------------- objects

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (S3), or the root directory (local)."""
        if not self.is_s3:
            assert self.local_root is not None
            self.local_root.mkdir(parents=True, exist_ok=True)
            return
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
        if not self.is_s3:
            return Path(self.uri(key)).is_file()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            return True
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return False
            raise StorageError(f"cannot stat {self.uri(key)}: {_error_code(exc)}") from None

    def size(self, key: str) -> int:
        """The size in bytes of an object; FileNotFoundError if it does not exist."""
        if not self.is_s3:
            p = Path(self.uri(key))
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist")
            return p.stat().st_size
        from botocore.exceptions import ClientError

        try:
            return int(
                self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))["ContentLength"]
            )
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise StorageError(f"cannot stat {self.uri(key)}: {_error_code(exc)}") from None

    def read_bytes(self, key: str) -> bytes:
        if not self.is_s3:
            p = Path(self.uri(key))
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist")
            return p.read_bytes()
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise StorageError(f"cannot read {self.uri(key)}: {code}") from None

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole: a reader sees the old content or the new, never a part.

        Locally: write a temporary file beside it, then rename. S3 PUT is atomic per object.
        """
        if not self.is_s3:
            p = Path(self.uri(key))
            tmp = _write_tmp(p, data)
            try:
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
        except ClientError as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {_error_code(exc)}") from None

    # ------------------------------------------------------- conditional writes

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write an object only if `key` does not exist yet; False if it already did.

        The check and the write are one atomic step: of several writers racing for one key,
        exactly one gets True. Locally a hard link of a complete temporary file; on S3 a
        conditional PUT (``If-None-Match: *``).
        """
        if not self.is_s3:
            p = Path(self.uri(key))
            tmp = _write_tmp(p, data)
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
        return self._put_if(key, data, IfNoneMatch="*")

    def read_bytes_tagged(self, key: str) -> tuple[bytes, str]:
        """An object's content and a tag of that content, for :meth:`replace_bytes`."""
        if not self.is_s3:
            data = self.read_bytes(key)
            return data, hashlib.sha256(data).hexdigest()
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))
            return resp["Body"].read(), str(resp["ETag"])
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise StorageError(f"cannot read {self.uri(key)}: {_error_code(exc)}") from None

    def replace_bytes(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        """Compare-and-swap: write only if the object still has `expected_tag`.

        `expected_tag` comes from :meth:`read_bytes_tagged`; None means "only if the object
        does not exist". Returns False when another writer got there first. Locally an
        exclusive ``flock`` around read-compare-rename; on S3 a conditional PUT (``If-Match``).
        """
        if expected_tag is None:
            return self.create_bytes(key, data)
        if not self.is_s3:
            p = Path(self.uri(key))
            with _file_lock(p.with_name(f".{p.name}.lock")):
                try:
                    _, tag = self.read_bytes_tagged(key)
                except FileNotFoundError:
                    return False
                if tag != expected_tag:
                    return False
                self.write_bytes(key, data)
                return True
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

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def delete(self, key: str) -> None:
        if not self.is_s3:
            Path(self.uri(key)).unlink(missing_ok=True)
            return
        self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`, sorted."""
        return sorted(self._iter_keys(prefix))

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        prefix = _clean_key(prefix)
        if not self.is_s3:
            base = Path(self.uri(prefix))
            if base.is_file():
                yield prefix
                return
            if not base.is_dir():
                return
            assert self.local_root is not None
            for p in base.rglob("*"):
                if p.is_file() and not _skip_local(p.name):
                    yield p.relative_to(self.local_root).as_posix()
            return
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
        """Names of the immediate sub-folders of `prefix`."""
        prefix = _clean_key(prefix)
        if not self.is_s3:
            base = Path(self.uri(prefix))
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        full = self._s3_key(prefix)
        full = f"{full}/" if full else ""
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(full):].rstrip("/"))
        return sorted(names)

    # ---------------------------------------------------------------- folders

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

    def upload_file(self, local: str | os.PathLike[str], key: str) -> None:
        if not self.is_s3:
            dest = Path(self.uri(key))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(local).resolve() != dest.resolve():
                # a private temporary name: concurrent uploads of one key must not share it
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
                os.close(fd)
                try:
                    shutil.copyfile(local, tmp)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            return
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(str(local), self.bucket, self._s3_key(key))
        except S3UploadFailedError as exc:
            raise StorageError(f"cannot upload to {self.uri(key)}: {exc}") from None

    def download_file(self, key: str, local: str | os.PathLike[str]) -> Path:
        """Copy one object to a local file (FileNotFoundError if it does not exist)."""
        out = Path(local)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_s3:
            src = Path(self.uri(key))
            if not src.is_file():
                raise FileNotFoundError(f"{src} does not exist")
            shutil.copyfile(src, out)
            return out
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._s3_key(key), str(out))
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise StorageError(f"cannot read {self.uri(key)}: {_error_code(exc)}") from None
        return out

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

    def local_dir(self, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local folder holding `key`: the folder itself locally, a downloaded copy on S3."""
        if not self.is_s3:
            p = Path(self.uri(key))
            if not p.is_dir():
                raise FileNotFoundError(f"{p} does not exist")
            return p
        cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="modula-"))
        return self.download_dir(key, cache)
