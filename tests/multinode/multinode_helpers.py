"""What the multi-node tests share: the cluster's nodes by name, where actors run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

OBJECT_STORE = 128 * 1024 * 1024


class Nodes:
    """The cluster's nodes by name: ``head`` and the worker nodes the tests add."""

    def __init__(self, cluster: Any, tmp: Path):
        self.cluster = cluster
        self.tmp = tmp
        self.nodes: dict[str, Any] = {"head": cluster.head_node}

    def add(self, name: str, num_cpus: float, resources: dict[str, float]) -> str:
        """Start a worker node; returns its node id once the cluster sees it."""
        assert name not in self.nodes, name
        tmp = self.tmp / name
        tmp.mkdir(parents=True, exist_ok=True)
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(tmp)  # inherited by the raylet and its workers only
        try:
            node = self.cluster.add_node(num_cpus=num_cpus, resources=resources,
                                         object_store_memory=OBJECT_STORE)
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before
        self.cluster.wait_for_nodes()
        self.nodes[name] = node
        return node.node_id

    def id(self, name: str) -> str:
        return self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next((n for n, node in self.nodes.items() if node.node_id == node_id),
                    f"(gone) {node_id[:8]}")

    def tmpdir(self, name: str) -> Path:
        return self.tmp / name

    def remove(self, name: str, graceful: bool = False) -> None:
        """Take a worker node away: abruptly by default (its raylet and every process on it
        killed, as when a machine dies), gracefully when asked."""
        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=graceful)

    def wait_gone(self, node_id: str, timeout: float = 60.0) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"node {node_id[:8]} still alive after {timeout} s")

    def remove_workers(self) -> None:
        for name in [n for n in self.nodes if n != "head"]:
            self.remove(name, graceful=True)


def actor_nodes(class_name: str | None = None, name_prefix: str | None = None
                ) -> dict[str, str]:
    """Live actors of this cluster (by class name or actor-name prefix): actor id -> node id."""
    import ray._private.state

    out = {}
    for aid, a in ray._private.state.actors().items():
        if a.get("State") != "ALIVE":
            continue
        if class_name is not None and a.get("ActorClassName") != class_name:
            continue
        if name_prefix is not None and not str(a.get("Name", "")).startswith(name_prefix):
            continue
        out[aid] = a["Address"]["NodeID"]
    return out
