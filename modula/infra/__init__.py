"""Storage (a local path or s3:// through boto3 and pyarrow.fs), the expert registry, metrics."""

from modula.infra.storage import Storage, StorageError

__all__ = ["Storage", "StorageError"]
