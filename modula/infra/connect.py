"""Connecting to Ray from the config: one helper that every command and runner uses."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from modula.config.schema import ClusterConfig
from modula.errors import ModulaError

__all__ = ["RayAddressError", "connect", "dashboard_port", "ray_init_kwargs", "ray_session"]

# Local Ray on a laptop: no token auth (Ray >= 2.59 turns it on by default), no usage stats.
_LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RayAddressError(ModulaError, ConnectionError):
    """``cluster.address`` names something this process cannot join."""


def ray_init_kwargs(cluster: ClusterConfig) -> dict[str, Any]:
    """The arguments of ``ray.init`` for this cluster section."""
    kw: dict[str, Any] = {"namespace": cluster.namespace, "log_to_driver": True}
    if cluster.runtime_env:
        kw["runtime_env"] = cluster.runtime_env
    if cluster.is_local:
        kw.update(
            # a new Ray here, even when a `ray start` cluster runs on this machine (with no
            # address ray.init joins the one in /tmp/ray/ray_current_cluster, and then refuses
            # num_cpus)
            address="local",
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            include_dashboard=cluster.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=cluster.dashboard_port,
        )
        if cluster.resources:
            kw["resources"] = dict(cluster.resources)
        if cluster.object_store_memory_mb:
            kw["object_store_memory"] = cluster.object_store_memory_mb * 1024 * 1024
    else:
        kw["address"] = cluster.address
    return kw


def dashboard_port(wanted: int) -> int:
    """`wanted` if it is free on loopback, else a free port: another local Ray (a second
    `modula` command, a test session) may hold the default 8265, and Ray refuses to start."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger(__name__).warning("dashboard port %d is taken; the dashboard of this "
                                        "local Ray is on %d", wanted, port)
    return port


def connect(cluster: ClusterConfig) -> dict[str, float]:
    """Start (``local``) or join (any other address) Ray; returns the cluster's resources.

    Reuses a connection that is already up, so a command run inside a Ray job (where the job's
    driver is already connected) does not start a second cluster.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    # inside a Ray job (`modula submit`), RAY_ADDRESS names the cluster the job runs on
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], namespace=cluster.namespace)
        return ray.cluster_resources()
    if cluster.address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"cluster.address {cluster.address!r} is the Jobs API of a cluster: run this command "
            "there with `modula submit`, or set cluster.address to ray://HOST:10001 or HOST:6379"
        )
    kw = ray_init_kwargs(cluster)
    if cluster.is_local:
        for k, v in _LOCAL_ENV.items():
            os.environ.setdefault(k, v)
        if kw.get("include_dashboard"):
            kw["dashboard_port"] = dashboard_port(cluster.dashboard_port)
    ray.init(**kw)
    return ray.cluster_resources()


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[dict[str, float]]:
    """``connect`` for the length of a block; shuts Ray down only if this block started it."""
    import ray

    started = not ray.is_initialized()
    resources = connect(cluster)
    try:
        yield resources
    finally:
        if started:
            ray.shutdown()
