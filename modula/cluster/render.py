"""Deploy files for a real cluster, generated from the one config.

- ``serve``: a Ray Serve config file (``serve deploy``), checked against ``ServeDeploySchema``;
- ``rayjob`` / ``raycluster`` / ``rayservice``: KubeRay ``ray.io/v1`` manifests, each preceded by
  a ConfigMap that carries the modula config into every pod at ``/etc/modula/config.yaml``;
- ``cluster-launcher``: a ``ray up`` YAML, checked against the schema inside the ray wheel.

Secrets never reach a rendered file: the config embedded in a file has them removed, and the
pods read them from a Kubernetes Secret named ``<name>-secrets`` (keys documented in README).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modula.config.schema import ModulaConfig, NodeType
from modula.errors import ModulaError
from modula.serving import topology

__all__ = ["TARGETS", "RenderError", "render_target", "render_objects", "embedded_config"]

TARGETS = ("serve", "rayjob", "rayservice", "raycluster", "cluster-launcher")
CONFIG_MOUNT = "/etc/modula"
CONFIG_FILE = f"{CONFIG_MOUNT}/config.yaml"
HEAD_TYPE = "ray.head.default"

# Secret keys a pod may read; each maps to the environment variable the code reads.
SECRET_ENV = {
    "aws-access-key-id": "AWS_ACCESS_KEY_ID",
    "aws-secret-access-key": "AWS_SECRET_ACCESS_KEY",
    "api-keys": "MODULA_API_KEYS",
}


class RenderError(ModulaError, ValueError):
    """The config cannot be turned into the requested file (the message says why)."""

    exit_code = 2


def _k8s_name(cfg: ModulaConfig) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.serve.app_name.lower()).strip("-") or "modula"
    return name[:40]


def embedded_config(cfg: ModulaConfig) -> dict[str, Any]:
    """The resolved config as plain data with every secret removed (not masked: removed)."""
    data = cfg.to_data(secrets="drop")
    # inside a cluster, Ray is already there: connect to it rather than start one
    data["cluster"]["address"] = "auto"
    return data


def _needs_secrets(cfg: ModulaConfig) -> bool:
    return bool(cfg.storage.access_key_id or cfg.serve.api_keys)


# -------------------------------------------------------------------------------- serve


def serve_config(cfg: ModulaConfig) -> dict[str, Any]:
    """A Ray Serve config file (the schema of ``serve deploy`` and RayService.serveConfigV2)."""
    s = cfg.serve
    deployments = [{"name": name, **opts}
                   for name, opts in topology.deployment_options(cfg).items()]
    app: dict[str, Any] = {
        "name": s.app_name,
        "route_prefix": s.route_prefix,
        "import_path": topology.BUILDER_IMPORT_PATH,
        "args": {"config": embedded_config(cfg)},
        "deployments": deployments,
    }
    env = {k: v for k, v in cfg.cluster.runtime_env.items() if k != "working_dir"}
    if env:
        app["runtime_env"] = env
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": s.port},
        "applications": [app],
    }


def check_serve_config(data: dict[str, Any]) -> None:
    """Validate with Ray Serve's own schema; raises RenderError naming the problem."""
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise RenderError(f"the Serve config does not validate: {exc}") from None


# -------------------------------------------------------------------------------- KubeRay


def _quantity_mem(gb: int) -> str:
    return f"{gb}Gi"


def _pod_template(cfg: ModulaConfig, node: NodeType, container: str, head: bool) -> dict[str, Any]:
    k8s = cfg.cluster.kubernetes
    limits: dict[str, Any] = {"cpu": str(node.cpus), "memory": _quantity_mem(node.memory_gb)}
    if node.gpus:
        limits["nvidia.com/gpu"] = str(node.gpus)
    ports = (
        [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": cfg.serve.port, "name": "serve"},
        ]
        if head else []
    )
    env: list[dict[str, Any]] = [{"name": "MODULA_CONFIG", "value": CONFIG_FILE}]
    if cfg.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": cfg.storage.endpoint})
    if _needs_secrets(cfg):
        secret = f"{_k8s_name(cfg)}-secrets"
        for key, var in SECRET_ENV.items():
            env.append({
                "name": var,
                "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
            })
    spec: dict[str, Any] = {
        "containers": [{
            "name": container,
            "image": k8s.image,
            "imagePullPolicy": "IfNotPresent",
            "resources": {"limits": limits, "requests": dict(limits)},
            "env": env,
            "ports": ports,
            "volumeMounts": [{"name": "modula-config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
        }],
        "volumes": [{"name": "modula-config", "configMap": {"name": f"{_k8s_name(cfg)}-config"}}],
    }
    if not ports:
        del spec["containers"][0]["ports"]
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if node.accelerator_type:
        spec["nodeSelector"] = {"cloud.google.com/gke-accelerator": node.accelerator_type}
    return {"spec": spec}


def ray_cluster_spec(cfg: ModulaConfig) -> dict[str, Any]:
    """The ``spec`` of a RayCluster (also RayJob.rayClusterSpec, RayService.rayClusterConfig)."""
    head = cfg.cluster.head
    workers = []
    for w in cfg.cluster.workers:
        start = {"num-cpus": str(w.cpus)}
        if w.gpus:
            start["num-gpus"] = str(w.gpus)
        workers.append({
            "groupName": w.name,
            "replicas": w.min_workers,
            "minReplicas": w.min_workers,
            "maxReplicas": w.max_workers,
            "rayStartParams": start,
            "template": _pod_template(cfg, w, "ray-worker", head=False),
        })
    head_start = {"dashboard-host": "0.0.0.0", "num-cpus": str(head.cpus)}
    if head.gpus:
        head_start["num-gpus"] = str(head.gpus)
    autoscale = any(w.min_workers != w.max_workers for w in cfg.cluster.workers)
    spec: dict[str, Any] = {
        "rayVersion": "2.60.0",
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": {
            "rayStartParams": head_start,
            "template": _pod_template(cfg, head, "ray-head", head=True),
        },
        "workerGroupSpecs": workers,
    }
    if autoscale:
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 60}
    return spec


def _metadata(cfg: ModulaConfig, suffix: str = "") -> dict[str, Any]:
    return {
        "name": f"{_k8s_name(cfg)}{suffix}",
        "namespace": cfg.cluster.kubernetes.namespace,
        "labels": {"app.kubernetes.io/name": "modula", "app.kubernetes.io/instance": _k8s_name(cfg)},
    }


def config_map(cfg: ModulaConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(cfg, "-config"),
        "data": {"config.yaml": yaml.safe_dump(embedded_config(cfg), sort_keys=False)},
    }


def _runtime_env_yaml(cfg: ModulaConfig) -> str | None:
    env = {k: v for k, v in cfg.cluster.runtime_env.items() if k != "working_dir"}
    return yaml.safe_dump(env, sort_keys=False) if env else None


def ray_job(cfg: ModulaConfig, command: str) -> dict[str, Any]:
    argv = shlex.split(command)
    if not argv:
        raise RenderError("--command is empty (expected a modula command, e.g. 'train')")
    if argv[0] in ("modula", "python"):
        raise RenderError("--command is the modula subcommand only, e.g. 'train --stage all'")
    entry = shlex.join(["python", "-m", "modula.cli", *argv, "--config", CONFIG_FILE])
    spec: dict[str, Any] = {
        "entrypoint": entry,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,
        "rayClusterSpec": ray_cluster_spec(cfg),
    }
    rt = _runtime_env_yaml(cfg)
    if rt:
        spec["runtimeEnvYAML"] = rt
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(cfg, "-job"),
            "spec": spec}


def ray_cluster(cfg: ModulaConfig) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(cfg),
            "spec": ray_cluster_spec(cfg)}


def ray_service(cfg: ModulaConfig) -> dict[str, Any]:
    serve = serve_config(cfg)
    check_serve_config(serve)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(cfg),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(cfg),
        },
    }


# -------------------------------------------------------------------------------- ray up

_AWS_DEFAULT = {"cpu": "m5.2xlarge", "gpu": "g5.2xlarge"}
_GCP_DEFAULT = {"cpu": "n2-standard-8", "gpu": "g2-standard-8"}
_AZURE_DEFAULT = {"cpu": "Standard_D8s_v5", "gpu": "Standard_NC8as_T4_v3"}


def _node_config(cfg: ModulaConfig, node: NodeType) -> dict[str, Any]:
    kind = "gpu" if node.gpus else "cpu"
    p = cfg.cluster.provider
    if p.type == "aws":
        return {
            "InstanceType": node.instance_type or _AWS_DEFAULT[kind],
            "BlockDeviceMappings": [
                {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200, "VolumeType": "gp3"}}
            ],
        }
    if p.type == "gcp":
        out: dict[str, Any] = {
            "machineType": node.instance_type or _GCP_DEFAULT[kind],
            "disks": [{
                "boot": True, "autoDelete": True, "type": "PERSISTENT",
                "initializeParams": {
                    "diskSizeGb": 200,
                    "sourceImage": "projects/deeplearning-platform-release/global/images/family/common-cu124",
                },
            }],
        }
        if node.gpus:
            out["guestAccelerators"] = [{
                "acceleratorType": node.accelerator_type or "nvidia-l4",
                "acceleratorCount": node.gpus,
            }]
            out["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]
        return out
    if p.type == "azure":
        return {"azure_arm_parameters": {"vmSize": node.instance_type or _AZURE_DEFAULT[kind]}}
    return {}


def cluster_launcher(cfg: ModulaConfig) -> dict[str, Any]:
    c = cfg.cluster
    p = c.provider
    provider: dict[str, Any] = {"type": p.type}
    if p.type == "aws":
        provider.update(region=p.region, cache_stopped_nodes=False)
        if p.availability_zone:
            provider["availability_zone"] = p.availability_zone
    elif p.type == "gcp":
        provider.update(region=p.region, availability_zone=p.availability_zone or f"{p.region}-a",
                        project_id="${GCP_PROJECT_ID}")
    elif p.type == "azure":
        provider.update(location=p.region, resource_group="modula",
                        subscription_id="${AZURE_SUBSCRIPTION_ID}")
    else:
        if not p.head_ip:
            raise RenderError("cluster.provider.head_ip is required for provider type 'local'")
        provider.update(head_ip=p.head_ip, worker_ips=list(p.worker_ips))

    def resources(node: NodeType) -> dict[str, Any]:
        r: dict[str, Any] = {"CPU": node.cpus}
        if node.gpus:
            r["GPU"] = node.gpus
        return r

    node_types: dict[str, Any] = {
        HEAD_TYPE: {
            "resources": resources(c.head),
            "node_config": _node_config(cfg, c.head),
            "min_workers": 0,
            "max_workers": 0,
        }
    }
    for w in c.workers:
        if w.name == HEAD_TYPE:
            raise RenderError(f"cluster.workers: name {w.name!r} is reserved for the head")
        node_types[w.name] = {
            "resources": resources(w),
            "node_config": _node_config(cfg, w),
            "min_workers": w.min_workers,
            "max_workers": w.max_workers,
        }
    remote_dir = "/home/ray/modula"
    out: dict[str, Any] = {
        "cluster_name": _k8s_name(cfg),
        "max_workers": sum(w.max_workers for w in c.workers),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {
            "image": c.docker_image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "provider": provider,
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "file_mounts": {remote_dir: c.project_dir},
        "rsync_exclude": [".venv", "runs", ".git", "**/__pycache__"],
        "setup_commands": [
            f"pip install --quiet -e {remote_dir}",
            f"mkdir -p {CONFIG_MOUNT} && cat > {CONFIG_FILE} <<'EOF'\n"
            + yaml.safe_dump(embedded_config(cfg), sort_keys=False) + "EOF",
        ],
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            "--object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
    if p.type == "local":
        # on-premise: the machines are given as IPs, not node types, and run as they are
        for key in ("docker", "available_node_types", "head_node_type"):
            out.pop(key)
        out["max_workers"] = len(p.worker_ips)
    return out


def check_cluster_launcher(data: dict[str, Any]) -> None:
    """Validate with the JSON schema shipped in the ray wheel (ray/autoscaler/ray-schema.json)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RenderError(f"cluster launcher YAML: {where}: {exc.message}") from None


# -------------------------------------------------------------------------------- entry


def render_objects(cfg: ModulaConfig, target: str, command: str = "train") -> list[dict[str, Any]]:
    """The documents of a target, as data (tests validate these)."""
    if target == "serve":
        data = serve_config(cfg)
        check_serve_config(data)
        return [data]
    if target == "cluster-launcher":
        data = cluster_launcher(cfg)
        check_cluster_launcher(data)
        return [data]
    if target == "rayjob":
        return [config_map(cfg), ray_job(cfg, command)]
    if target == "raycluster":
        return [config_map(cfg), ray_cluster(cfg)]
    if target == "rayservice":
        return [config_map(cfg), ray_service(cfg)]
    raise RenderError(f"unknown target {target!r} (allowed: {', '.join(TARGETS)})")


def render_target(cfg: ModulaConfig, target: str, command: str = "train",
                  config_path: str | None = None) -> str:
    """The text of a target's file (multi-document YAML for the KubeRay targets)."""
    docs = render_objects(cfg, target, command)
    head = f"# generated by `modula render --target {target}`"
    if config_path:
        head += f" from {config_path}"
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    return f"{head}\n{body}"
