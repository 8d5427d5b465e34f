"""What the data, models and runs sit on: the storage map (``layout``), storage (a local path or
s3:// through boto3 and pyarrow.fs), the expert registry, local file helpers and the Ray
connection."""

from modula.infra.connect import connect, ray_session
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
    "connect",
    "ray_session",
]
