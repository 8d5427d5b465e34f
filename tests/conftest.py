"""Shared fixtures. Ray starts at most once per test session (docs/ray.md): most tests are
Ray-free `unit` tests; tests that need Ray, Serve or S3 are marked `integration` and take the
session-scoped fixtures below."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Before anything imports ray: no token auth, no usage stats, fast Train health checks.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


MULTINODE = Path(__file__).resolve().parent / "multinode"


def pytest_ignore_collect(collection_path, config):
    """tests/multinode runs in a pytest process of its own (`make test` starts it after this
    one): its driver joins a multi-node cluster, and a driver is connected to one Ray cluster
    at a time while this session shares one local Ray. Collected only when a path given on the
    command line is that folder or inside it."""
    if Path(collection_path).resolve() != MULTINODE:
        return None
    for arg in config.args:
        p = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if p == MULTINODE or MULTINODE in p.parents:
            return None
    return True


def pytest_collection_modifyitems(config, items):
    """Tests with no marker are unit tests; integration tests run after all unit tests."""
    for item in items:
        if not any(m.name in ("unit", "integration") for m in item.iter_markers()):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda it: 1 if it.get_closest_marker("integration") else 0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: torch's threads only add overhead (and contention on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, logical CPUs over-subscribed (2 real cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # our own Ray, even when another one runs on this machine
            num_cpus=4,
            num_gpus=0,
            include_dashboard=False,
            namespace="modula-tests",
            log_to_driver=False,
            object_store_memory=256 * 1024 * 1024,
        )
    yield ray
    ray.shutdown()


@pytest.fixture()
def repo_root() -> Path:
    return REPO_ROOT


# --------------------------------------------------------------------------------------------
# S3 on loopback: moto's standalone server in a thread, spoken to over HTTP by boto3 and pyarrow
# (docs/ray.md). One server per session; every test gets a fresh bucket and prefix.

S3_TEST_ACCESS_KEY = "AKIAMODULATESTKEY01"
S3_TEST_SECRET_KEY = "modula-test-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL (``http://127.0.0.1:PORT``) of an S3-compatible server on loopback."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # dummy credentials for this process (and what it starts); no user AWS config is read
        mp.setenv("AWS_ACCESS_KEY_ID", S3_TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def s3_storage_config(endpoint: str, bucket: str | None = None, prefix: str | None = None,
                      credentials: bool = True):
    """A StorageConfig for `bucket`/`prefix` (fresh random names by default) on `endpoint`."""
    import uuid

    from modula.config import StorageConfig

    bucket = bucket or f"modula-test-{uuid.uuid4().hex[:12]}"
    prefix = prefix if prefix is not None else f"p-{uuid.uuid4().hex[:8]}"
    root = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    creds = {"access_key_id": S3_TEST_ACCESS_KEY,
             "secret_access_key": S3_TEST_SECRET_KEY} if credentials else {}
    return StorageConfig(root=root, endpoint=endpoint, region="us-east-1", **creds)


@pytest.fixture()
def s3_storage(s3_server):
    """A Storage on a fresh, created bucket + prefix of the session's S3 server."""
    from modula.infra.storage import Storage

    storage = Storage(s3_storage_config(s3_server))
    storage.ensure_bucket()
    return storage


@pytest.fixture()
def s3_atomic_conditional_writes(s3_server, monkeypatch):
    """AWS S3's semantics for conditional writes on the loopback server: moto 5 checks
    ``If-None-Match`` / ``If-Match`` and then writes, two steps that concurrent requests can
    interleave (test_storage.py shows it); AWS S3 does both as one. Serialising moto's object
    PUT handler (the server runs in this process) makes check-and-write one step, so the
    registry's races can be tested under the guarantee it relies on (docs/architecture.md)."""
    import threading

    from moto.s3.responses import S3Response

    lock = threading.Lock()
    real = S3Response.put_object

    def put_object(self, *args, **kwargs):
        with lock:
            return real(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    return lock


@pytest.fixture(scope="module")
def s3_module():
    """For modules that cannot import this conftest (tests/multinode has its own): a function
    that gives (the storage section as data, credentials included; a Storage) on a fresh
    bucket of the session's S3 server."""
    from modula.infra.storage import Storage

    def make(endpoint: str):
        sc = s3_storage_config(endpoint)
        st = Storage(sc)
        st.ensure_bucket()
        return sc.model_dump(mode="python") | {
            "access_key_id": sc.access_key_id.get_secret_value(),
            "secret_access_key": sc.secret_access_key.get_secret_value()}, st

    return make
