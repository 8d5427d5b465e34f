"""Storage (a local path or s3:// through boto3 and pyarrow.fs), the expert registry, metrics."""

from modula.infra.registry import (
    BaseModelRef,
    ExpertEntry,
    ExpertSpec,
    FileEntry,
    LocalModel,
    ModelNotFound,
    ModelVersion,
    Registry,
    RegistryConflict,
    RegistryError,
)
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
    "Storage",
    "StorageError",
]
