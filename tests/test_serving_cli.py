"""``modula serve`` and the application builder, Ray-free: what is checked before deploying,
the builder's arguments (exactly what ``modula render --target serve`` writes), secrets."""

from __future__ import annotations

import pytest
from serving_fixtures import DOMAINS, make_base_model, publish_model, serving_config
from typer.testing import CliRunner

from modula.cli import app
from modula.serving import topology
from modula.serving.app import build_app, build_graph, replica_config
from modula.serving.topology import deployment_options


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-base")
    make_base_model(path)
    return path


def write_config(path, root, base, **serve) -> str:
    import yaml

    cfg = serving_config(root, base, **serve)
    data = cfg.model_dump(mode="json")
    data["serve"]["api_keys"] = [k.get_secret_value() for k in cfg.serve.api_keys]
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_serve_refuses_when_nothing_is_published(tmp_path, base_dir):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs", base_dir)
    res = CliRunner().invoke(app, ["serve", "--config", cfg])
    assert res.exit_code == 1
    assert "no published version of 'modula'" in res.output
    assert "Traceback" not in res.output


def test_serve_refuses_a_missing_base_model(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs", tmp_path / "nowhere")
    res = CliRunner().invoke(app, ["serve", "--config", cfg])
    assert res.exit_code == 1 and "not a Hugging Face model directory" in res.output


def test_serve_rejects_a_bad_config(tmp_path, base_dir):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs", base_dir)
    res = CliRunner().invoke(app, ["serve", "--config", cfg, "--set", "serve.port=0"])
    assert res.exit_code == 2 and "serve.port" in res.output


def test_preflight_reports_what_will_be_served(tmp_path, base_dir):
    from modula.serving.deploy import preflight

    cfg = serving_config(tmp_path / "runs", base_dir, experts_per_deployment=2)
    version, _ = publish_model(cfg, DOMAINS)
    info = preflight(cfg)
    assert info["version"] == version and info["domains"] == DOMAINS
    assert info["deployments"] == ["Experts0", "Experts1"]
    assert info["groups"] == [["code", "math"], ["units", "headlines"]]
    base_only = serving_config(tmp_path / "runs", base_dir, base_only=True)
    assert preflight(base_only)["version"] is None


def test_builder_takes_the_rendered_args(tmp_path, base_dir, monkeypatch):
    from ray.serve import Application

    from modula.cluster.render import render_objects

    cfg = serving_config(tmp_path / "runs", base_dir, experts_per_deployment=2)
    (doc,) = render_objects(cfg, "serve")
    args = doc["applications"][0]["args"]
    monkeypatch.setenv("MODULA_API_KEYS", "k1, k2")
    assert isinstance(build_app(args), Application)
    with pytest.raises(ValueError, match="args: {config:"):
        build_app({})
    with pytest.raises(ValueError, match="serve.port"):
        build_app({"config": {**args["config"], "serve": {**args["config"]["serve"],
                                                           "port": -1}}})


def test_deployment_options_are_the_rendered_ones(tmp_path, base_dir):
    cfg = serving_config(tmp_path / "runs", base_dir, experts_per_deployment=2,
                         autoscaling={"min_replicas": 1, "max_replicas": 3,
                                      "target_ongoing_requests": 4})
    opts = deployment_options(cfg)
    assert list(opts) == [topology.INGRESS, topology.ROUTER, "Experts0", "Experts1"]
    auto = opts["Experts1"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == \
        (1, 3, 4)
    assert opts["Experts0"]["ray_actor_options"]["num_cpus"] == cfg.serve.resources.num_cpus
    build_graph(cfg)  # binds without Ray


def test_secrets_never_reach_the_replicas_in_clear(tmp_path, base_dir):
    cfg = serving_config(tmp_path / "runs", base_dir, api_keys=["sk-secret"])
    data = replica_config(cfg)
    assert "api_keys" not in data["serve"]
    assert "sk-secret" not in repr(data)
    assert "access_key_id" not in data["storage"]
