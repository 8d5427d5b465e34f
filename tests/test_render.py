"""`modula render`: every target checked against the real schema it must satisfy.

- serve: Ray Serve's own ``ServeDeploySchema``;
- cluster-launcher: the JSON schema inside the ray wheel (``ray/autoscaler/ray-schema.json``);
- KubeRay manifests: pod templates against the Kubernetes API models (the ``kubernetes``
  client's OpenAPI types, strictly: an unknown key fails), the cluster spec through Ray's own
  KubeRay autoscaler parser (the code a real RayCluster's autoscaler runs) whose output must in
  turn pass ray-schema.json, and the CR's top-level fields against the ray.io/v1 CRD field names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from modula.cluster.render import (
    CONFIG_FILE,
    TARGETS,
    RenderError,
    render_objects,
    render_target,
)
from modula.config import ModulaConfig, config_from_dict, load_config

# ray.io/v1 CRD spec fields (ray-operator/config/crd/bases, KubeRay v1.4)
CRD_SPEC_FIELDS = {
    "RayCluster": {"autoscalerOptions", "enableInTreeAutoscaling", "headGroupSpec",
                   "headServiceAnnotations", "rayVersion", "suspend", "workerGroupSpecs",
                   "gcsFaultToleranceOptions", "managedBy"},
    "RayJob": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
               "managedBy", "metadata", "rayClusterSpec", "runtimeEnvYAML",
               "shutdownAfterJobFinishes", "submissionMode", "submitterPodTemplate",
               "submitterConfig", "suspend", "ttlSecondsAfterFinished", "deletionStrategy"},
    "RayService": {"deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc",
                   "rayClusterConfig", "serveConfigV2", "serveService",
                   "serviceUnhealthySecondThreshold", "upgradeStrategy"},
}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_FIELDS = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas",
                       "numOfHosts", "rayStartParams", "replicas", "scaleStrategy", "suspend",
                       "template"}


def check_k8s_model(data, type_name: str, path: str = "") -> None:
    """Strictly check `data` against a Kubernetes OpenAPI model of the kubernetes client."""
    import kubernetes.client.models as models

    if type_name in ("str", "int", "bool", "float", "object", "datetime"):
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float),
                    "object": object, "datetime": str}[type_name]
        assert isinstance(data, expected), f"{path}: expected {type_name}, got {data!r}"
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        assert isinstance(data, list), f"{path}: expected a list"
        for i, item in enumerate(data):
            check_k8s_model(item, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"dict[\[(]str, (.+)[\])]", type_name)
    if m:
        assert isinstance(data, dict), f"{path}: expected a mapping"
        for k, v in data.items():
            check_k8s_model(v, m.group(1), f"{path}.{k}")
        return
    cls = getattr(models, type_name)
    assert isinstance(data, dict), f"{path}: expected a {type_name} mapping"
    by_json = {v: k for k, v in cls.attribute_map.items()}
    for key, value in data.items():
        assert key in by_json, f"{path}.{key}: not a field of {type_name} (allowed: {sorted(by_json)})"
        check_k8s_model(value, cls.openapi_types[by_json[key]], f"{path}.{key}")
    # required fields: the model's constructor refuses None for them
    kwargs = {by_json[k]: v for k, v in data.items()}
    cls(**kwargs)


def ray_up_check(doc: dict) -> dict:
    """What `ray up` does with a cluster file before using it: fill defaults, validate."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(doc))
    validate_config(prepared)
    return prepared


def _check_cluster_spec(spec: dict, cfg: ModulaConfig, name: str, namespace: str) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.util import validate_config

    assert set(spec) <= CRD_SPEC_FIELDS["RayCluster"], set(spec) - CRD_SPEC_FIELDS["RayCluster"]
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    check_k8s_model(spec["headGroupSpec"]["template"], "V1PodTemplateSpec", "head.template")
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP_FIELDS
        check_k8s_model(g["template"], "V1PodTemplateSpec", f"{g['groupName']}.template")
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    # what a RayCluster's in-tree autoscaler derives from this spec must be a valid Ray config
    autoscaling = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )
    validate_config(autoscaling)
    node_types = autoscaling["available_node_types"]
    for w in cfg.cluster.workers:
        nt = node_types[w.name]
        assert nt["min_workers"] == w.min_workers and nt["max_workers"] == w.max_workers
        assert nt["resources"]["CPU"] == w.cpus
        assert nt["resources"].get("GPU", 0) == w.gpus
        assert nt["resources"]["memory"] == w.memory_gb * 2**30
    assert node_types["headgroup"]["resources"]["CPU"] == cfg.cluster.head.cpus


@pytest.fixture(params=["default", "example"])
def cfg(request, repo_root, monkeypatch) -> ModulaConfig:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-RENDER-TEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "render-secret-value")
    monkeypatch.setenv("MODULA_API_KEY", "sk-render-secret")
    name = "default.yaml" if request.param == "default" else "cluster.example.yaml"
    return load_config(repo_root / "configs" / name)


def test_serve_config_is_a_valid_serve_deploy_file(cfg):
    from ray.serve.schema import ServeDeploySchema

    (doc,) = render_objects(cfg, "serve")
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "modula.serving.app:build_app"
    assert app.route_prefix == cfg.serve.route_prefix
    deps = {d.name: d for d in app.deployments}
    experts = [d for n, d in deps.items() if n.startswith("Experts")]
    groups = -(-len(cfg.expert_domains(include_reserved=True)) // (cfg.serve.experts_per_deployment or 99))
    assert len(experts) == groups
    auto = experts[0].autoscaling_config
    assert auto["min_replicas"] == cfg.serve.autoscaling.min_replicas
    assert auto["max_replicas"] == cfg.serve.autoscaling.max_replicas
    assert auto["target_ongoing_requests"] == cfg.serve.autoscaling.target_ongoing_requests
    assert experts[0].ray_actor_options.num_gpus == cfg.serve.resources.num_gpus
    # the embedded config is valid and complete, minus secrets
    embedded = app.args["config"]
    again = config_from_dict(embedded)
    assert again.modula == cfg.modula and again.domains == cfg.domains
    assert again.cluster.address == "auto"


def test_replica_custom_resources_reach_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    cfg = config_from_dict({"serve": {"resources": {"num_cpus": 0.5,
                                                    "custom_resources": {"expert_host": 1}}}})
    (doc,) = render_objects(cfg, "serve")
    (app,) = ServeDeploySchema.model_validate(doc).applications
    deps = {d.name: d for d in app.deployments}
    assert deps["Experts"].ray_actor_options.resources == {"expert_host": 1.0}
    assert deps["Experts"].ray_actor_options.num_cpus == 0.5
    # the ingress and the router reserve no custom resource
    assert not deps["Router"].ray_actor_options.resources


def test_cluster_launcher_validates_against_ray_schema(cfg):
    (doc,) = render_objects(cfg, "cluster-launcher")
    ray_up_check(doc)  # ray-schema.json, as `ray up` does
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["max_workers"] == sum(w.max_workers for w in cfg.cluster.workers)
    for w in cfg.cluster.workers:
        nt = doc["available_node_types"][w.name]
        assert (nt["min_workers"], nt["max_workers"]) == (w.min_workers, w.max_workers)
        assert nt["resources"].get("GPU", 0) == w.gpus


def test_cluster_launcher_for_every_provider():
    for ptype in ("aws", "gcp", "azure"):
        c = config_from_dict({"cluster": {"provider": {"type": ptype, "region": "us-central1"},
                                          "workers": [{"name": "gpu", "gpus": 2}]}})
        (doc,) = render_objects(c, "cluster-launcher")
        ray_up_check(doc)
    c = config_from_dict({"cluster": {"provider": {"type": "local", "head_ip": "10.0.0.1",
                                                   "worker_ips": ["10.0.0.2"]}}})
    (doc,) = render_objects(c, "cluster-launcher")
    ray_up_check(doc)
    with pytest.raises(RenderError, match="head_ip is required"):
        render_objects(config_from_dict({"cluster": {"provider": {"type": "local"}}}),
                       "cluster-launcher")


def test_raycluster_manifest(cfg):
    cm, rc = render_objects(cfg, "raycluster")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    check_k8s_model(cm, "V1ConfigMap", "configmap")
    check_k8s_model(rc["metadata"], "V1ObjectMeta", "metadata")
    _check_cluster_spec(rc["spec"], cfg, rc["metadata"]["name"], rc["metadata"]["namespace"])
    # the config travels in the ConfigMap, validated, with its secrets removed
    inner = config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]))
    assert inner.storage.access_key_id is None and inner.serve.api_keys == []
    assert rc["spec"]["enableInTreeAutoscaling"] == any(
        w.min_workers != w.max_workers for w in cfg.cluster.workers)


def test_rayjob_manifest(cfg):
    cm, job = render_objects(cfg, "rayjob", command="train --stage all")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= CRD_SPEC_FIELDS["RayJob"]
    assert job["spec"]["entrypoint"] == f"python -m modula.cli train --stage all --config {CONFIG_FILE}"
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    _check_cluster_spec(job["spec"]["rayClusterSpec"], cfg, "job", "ns")
    if "runtimeEnvYAML" in job["spec"]:
        assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)
    with pytest.raises(RenderError, match="subcommand only"):
        render_objects(cfg, "rayjob", command="modula train")


def test_rayservice_manifest(cfg):
    from ray.serve.schema import ServeDeploySchema

    cm, svc = render_objects(cfg, "rayservice")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    assert set(svc["spec"]) <= CRD_SPEC_FIELDS["RayService"]
    assert isinstance(svc["spec"]["serveConfigV2"], str)  # the CRD wants the YAML as a string
    ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    _check_cluster_spec(svc["spec"]["rayClusterConfig"], cfg, "svc", "ns")


def test_no_secret_in_any_rendered_file(cfg):
    for target in TARGETS:
        text = render_target(cfg, target)
        for secret in ("AKIA-RENDER-TEST", "render-secret-value", "sk-render-secret"):
            assert secret not in text, (target, secret)
    if cfg.storage.access_key_id is not None:
        _, rc = render_objects(cfg, "raycluster")
        env = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        assert refs["AWS_SECRET_ACCESS_KEY"] == "modula-secrets"


def test_render_cli_writes_every_target(tmp_path, repo_root):
    from typer.testing import CliRunner

    from modula.cli import app

    runner = CliRunner()
    for target in TARGETS:
        out = tmp_path / f"{target}.yaml"
        res = runner.invoke(app, ["render", "-t", target, "-c",
                                  str(repo_root / "configs" / "default.yaml"), "-o", str(out)])
        assert res.exit_code == 0, res.output
        docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
        assert docs, target
    res = runner.invoke(app, ["render", "-t", "helm"])
    assert res.exit_code == 2
    assert "allowed: serve, rayjob" in res.output


def test_dockerfile_installs_the_package(repo_root):
    text = Path(repo_root / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "pip install" in text
    default_image = json.loads(ModulaConfig().cluster.kubernetes.model_dump_json())["image"]
    assert default_image.startswith("modula:")


def test_the_kubernetes_check_is_strict():
    good = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
    check_k8s_model(good, "V1PodTemplateSpec")
    with pytest.raises(AssertionError, match="containerz: not a field of V1PodSpec"):
        check_k8s_model({"spec": {"containerz": []}}, "V1PodTemplateSpec")
    with pytest.raises(ValueError, match="name"):
        check_k8s_model({"spec": {"containers": [{"image": "i"}]}}, "V1PodTemplateSpec")
    with pytest.raises(AssertionError, match="expected str"):
        check_k8s_model({"spec": {"containers": [{"name": "c", "image": 3}]}}, "V1PodTemplateSpec")
