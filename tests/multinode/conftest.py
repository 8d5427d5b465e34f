"""A Ray cluster of several nodes on this machine, for the tests of this folder.

``ray.cluster_utils.Cluster`` starts a head node (GCS, a raylet, the driver's node) and the
tests add worker nodes, each a raylet of its own with its own logical resources (custom
resources decide what may run where) and its own temporary folder (``TMPDIR``: what a process
of one node downloads, the others do not see). Nodes share only what real nodes share: the
network (loopback here) and S3, the moto server of tests/conftest.py.

This folder runs in its own pytest process (``make test`` starts ``pytest tests/multinode``
after ``pytest tests``; tests/conftest.py leaves the folder out of any run that does not name
it): a driver is connected to one Ray cluster at a time, and the main session's tests share
one local Ray.
"""

from __future__ import annotations

import time

import pytest
from multinode_helpers import OBJECT_STORE, Nodes

HEAD_CPUS = 4
# the GCS declares a silent node dead after period x threshold (Ray's defaults: 3 s x 5);
# shorter finds a lost node sooner, too short takes a busy machine's live node for dead
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_failure_threshold": 10}


def _patient_node_start() -> None:
    """A new node waits 30 s (hard-coded in ray/_private/node.py) for its raylet to appear in
    the GCS, then gives up; on a busy 2-core machine registering can take longer. Keep asking
    for up to 3 minutes."""
    import ray._private.services as services

    if getattr(services.get_node, "_patient", False):
        return
    real = services.get_node

    def get_node(*args, **kwargs):
        deadline = time.monotonic() + 180
        while True:
            try:
                return real(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    get_node._patient = True
    services.get_node = get_node


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The head node, the driver connected to it; worker nodes come and go per test."""
    import ray
    from ray.cluster_utils import Cluster

    _patient_node_start()

    assert not ray.is_initialized(), "tests/multinode needs a pytest process of its own"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "num_gpus": 0, "include_dashboard": False,
        "object_store_memory": OBJECT_STORE, "_system_config": SYSTEM_CONFIG})
    ray.init(address=c.address, namespace="modula-multinode", log_to_driver=False)
    nodes = Nodes(c, tmp_path_factory.mktemp("nodes"))
    try:
        yield nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture()
def nodes(cluster):
    """The cluster, with every worker node a test added removed when it ends."""
    try:
        yield cluster
    finally:
        cluster.remove_workers()
