"""Shared fixtures. Ray starts at most once per test session (RAY_NOTES.md): most tests are
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


def pytest_collection_modifyitems(config, items):
    """Tests with no marker are unit tests; integration tests run after all unit tests."""
    for item in items:
        if not any(m.name in ("unit", "integration") for m in item.iter_markers()):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda it: 1 if it.get_closest_marker("integration") else 0)


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
