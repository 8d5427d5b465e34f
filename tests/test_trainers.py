"""Staged training on Ray Train: the plan, checkpoints, a full train -> publish -> load round trip
on S3 (a real S3-compatible server on loopback), add-domain, a killed worker, bad checkpoints."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from modula.config import config_from_dict
from modula.trainers.common import CheckpointError, load_checkpoint, lr_at, save_checkpoint
from modula.trainers.plan import plan_stage, stage_runs

TINY = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}
SPLITS = {"train": 48, "validation": 8, "test": 8}


def _raw(root: str, steps: int = 3, **stage_extra) -> dict:
    stage = {"steps": steps, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
             "max_failures": 1, "scaling": {"num_workers": 1, "cpus_per_worker": 1}, **stage_extra}
    return {
        "storage": {"root": root},
        "cluster": {"dashboard": False},
        "model": {"tiny": TINY, "max_length": 96},
        "domains": [{"name": n, "splits": SPLITS} for n in ("general", "math", "units")]
        + [{"name": "headlines", "reserved": True, "metric": "accuracy", "splits": SPLITS}],
        "stages": {s: dict(stage) for s in ("universal", "domain", "router", "lora", "molora")},
    }


# ------------------------------------------------------------------------------ unit

def _s3_raw(s3_server, tiny_base) -> dict:
    """`_raw` on the S3 server of the session (secrets spelled out) with the tiny base."""
    from conftest import s3_storage_config

    sc = s3_storage_config(s3_server)
    raw = _raw(sc.root)
    raw["storage"] = sc.model_dump(mode="python") | {
        "access_key_id": sc.access_key_id.get_secret_value(),
        "secret_access_key": sc.secret_access_key.get_secret_value()}
    raw["model"]["base"] = str(tiny_base)
    return raw



def test_plan_follows_the_paper():
    cfg = config_from_dict(_raw("/tmp/x"))
    waves = plan_stage(cfg, "all")
    assert [[r.stage for r in w] for w in waves] == [["universal"], ["domains", "domains"], ["router"]]
    uni, (d1, d2), (router,) = waves[0][0], waves[1], waves[2]
    assert d2.trains == ("units",)
    assert uni.trains == ("universal",) and uni.data == ("general",) and uni.inputs == ()
    assert (d1.trains, d1.data, d1.model_stage) == (("math",), ("math",), "domain:math")
    assert d1.inputs == ("universal",)  # Res/Flan domain experts build on the frozen universal
    # the router stage trains the routers and the request classifier
    assert router.trains == ("routers", "classifier")
    assert set(router.inputs) == {"universal", "math", "units"}
    assert "headlines" not in router.domains  # reserved for the pluggability experiment
    # run names are stable (a rerun resumes) and change with the config
    assert [r.name for w in plan_stage(cfg, "all") for r in w] == [r.name for w in waves for r in w]
    cfg2 = config_from_dict(_raw("/tmp/x", steps=5))
    assert plan_stage(cfg2, "universal")[0][0].name != uni.name
    # packing: both domain experts in one run, each batch pinned to its domain
    packed = config_from_dict({**_raw("/tmp/x"), "stages": {"domain": {"domains_per_run": 2}}})
    (run,) = stage_runs(packed, "domains")
    assert run.pinned == ("math", "units") and run.model_stage is None
    # baselines train jointly on everything
    (lora,) = stage_runs(cfg, "lora")
    assert (lora.variant, lora.trains, lora.model_stage) == ("lora", ("universal",), "joint")
    (molora,) = stage_runs(cfg, "molora")
    assert molora.trains == ("math", "units", "routers") and molora.data == ("general", "math", "units")
    with pytest.raises(ValueError, match="baselines"):
        stage_runs(config_from_dict({**_raw("/tmp/x"), "modula": {"variant": "lora"}}), "universal")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_runs(cfg, "everything")


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.55)


def _tiny_modula():
    from transformers import LlamaConfig, LlamaForCausalLM

    from modula.model import attach_modula

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1))
    m = attach_modula(base, config_from_dict({}).modula, domains=["a", "b"])
    m.set_stage("router")
    return m


def test_checkpoint_round_trip_and_every_corruption(tmp_path):
    m = _tiny_modula()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (2, 8))
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "c", m, opt, {"step": 7, "tokens": 16})
    m2 = _tiny_modula()
    opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=0.1)
    state = load_checkpoint(tmp_path / "c", m2, opt2)
    assert state["step"] == 7
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)

    # a flipped byte, a missing file, no checksum list, another stage: clear errors, no restart
    (tmp_path / "bad").mkdir()
    import shutil
    for case in ("corrupt", "missing", "nosums", "stage"):
        d = tmp_path / case
        shutil.copytree(tmp_path / "c", d)
        if case == "corrupt":
            data = bytearray((d / "trainable.safetensors").read_bytes())
            data[-1] ^= 0xFF
            (d / "trainable.safetensors").write_bytes(bytes(data))
            match = "trainable.safetensors is corrupt"
        elif case == "missing":
            (d / "optimizer.safetensors").unlink()
            match = "optimizer.safetensors is missing"
        elif case == "nosums":
            (d / "checksums.json").unlink()
            match = "incomplete checkpoint"
        else:
            m2.set_stage("universal")
            opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=0.1)
            match = "the stage or model changed"
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(d, m2, opt2)


def test_a_run_hands_its_workers_storage_keys_and_placement_not_driver_paths(tmp_path):
    """Workers may run on another node: the trainer's loop config names the earlier stages'
    experts by storage key (each worker fetches them), never by a folder on the driver."""
    from modula.infra.storage import Storage
    from modula.trainers.progress import ProgressBoard
    from modula.trainers.runner import _trainer

    raw = _raw(str(tmp_path / "store"))
    raw["stages"]["router"]["scaling"] = {"num_workers": 2, "cpus_per_worker": 1,
                                          "placement": "spread",
                                          "custom_resources": {"trainer": 1}}
    cfg = config_from_dict(raw)
    (run,) = stage_runs(cfg, "router")
    trainer = _trainer(cfg, run, Storage(cfg.storage), {}, "work/modula/res",
                       ProgressBoard("board"), pad_id=0, validate=False)
    loop = trainer.train_loop_config
    assert loop["inputs_key"] == "work/modula/res"
    # nothing but the config, the run and the board's name: no local path at all
    plain = {k: v for k, v in loop.items() if k not in ("cfg", "run", "board")}
    assert not [v for v in plain.values() if isinstance(v, str) and Path(v).exists()]
    assert trainer.scaling_config.placement_strategy == "SPREAD"
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "trainer": 1.0}
    assert config_from_dict(_raw("/tmp/x")).stages.router.scaling.placement_strategy == "PACK"


def test_workers_read_local_inputs_in_place(tmp_path):
    from modula.infra.storage import Storage
    from modula.trainers.loop import fetch_inputs

    cfg = config_from_dict(_raw(str(tmp_path / "store")))
    (router,) = stage_runs(cfg, "router")
    st = Storage(cfg.storage)
    for name in ("universal", "math"):
        st.write_bytes(f"work/modula/res/{'universal' if name == 'universal' else 'domain-' + name}"
                       ".safetensors", name.encode())
    got = fetch_inputs(cfg, router, "work/modula/res", tmp_path / "cache")
    assert set(got) == {"universal", "math"}  # units was never trained: left out
    assert got["math"] == tmp_path / "store/work/modula/res/domain-math.safetensors"
    assert not (tmp_path / "cache").exists()  # nothing copied
    assert fetch_inputs(cfg, stage_runs(cfg, "universal")[0], "work/modula/res",
                        tmp_path / "cache") == {}


def test_add_domain_that_lost_a_race_says_to_run_again(tmp_path, monkeypatch):
    """Another version was published while the new expert trained: nothing is promoted, and
    the error says what to do."""
    from modula.infra.registry import Registry, RegistryConflict
    from modula.infra.storage import Storage
    from modula.trainers import runner

    cfg = config_from_dict(_raw(str(tmp_path / "store")))
    src = tmp_path / "v1"
    src.mkdir()
    for f in ("universal.safetensors", "domain-math.safetensors", "routers.safetensors"):
        (src / f).write_bytes(f.encode())
    Registry(Storage(cfg.storage)).publish("modula", src, {"domains": ["math"]})

    def lost(*args, **kwargs):
        raise RegistryConflict("model 'modula': version 2 was published while version 3 was "
                               "being published on 1; 3 was not promoted")
    monkeypatch.setattr(runner, "run_stage", lambda *a, **k: [])
    monkeypatch.setattr(runner, "publish", lost)
    with pytest.raises(RegistryConflict, match=r"trained on v1, which is no longer the latest: "
                                               r"run `modula add-domain units` again"):
        runner.add_domain(cfg, "units", show_progress=False)


# ------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_workers_fetch_s3_inputs_into_their_own_folder(s3_server, tiny_base, tmp_path):
    from modula.infra.storage import Storage
    from modula.trainers.loop import build_stage_model, fetch_inputs

    raw = _s3_raw(s3_server, tiny_base)
    cfg = config_from_dict(raw)
    st = Storage(cfg.storage)
    st.ensure_bucket()
    (uni,) = stage_runs(cfg, "universal")
    (math_run, _) = stage_runs(cfg, "domains")
    # a universal expert in the workspace, as the universal stage leaves it
    from modula.model import save_expert

    model = build_stage_model(cfg, uni, {})
    save_expert(model, "universal", tmp_path / "u.safetensors")
    st.upload_file(tmp_path / "u.safetensors", "work/modula/res/universal.safetensors")
    st.write_bytes("work/modula/res/domain-units.safetensors", b"not needed by math")
    got = fetch_inputs(cfg, math_run, "work/modula/res", tmp_path / "node-cache")
    assert got == {"universal": tmp_path / "node-cache/universal.safetensors"}
    assert sorted(p.name for p in (tmp_path / "node-cache").iterdir()) == ["universal.safetensors"]
    assert build_stage_model(cfg, math_run, got).domains == ["math", "units"]
    # a missing expert names the storage it was looked for in
    (router,) = stage_runs(cfg, "router")
    with pytest.raises(FileNotFoundError, match=r"expert 'math' .*s3://.*work/modula/res has no domain-math"):
        build_stage_model(cfg, router, fetch_inputs(cfg, router, "work/modula/res",
                                                    tmp_path / "c2"),
                          where=st.uri("work/modula/res"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Llama with the built-in tokenizer, saved like any HF model directory."""
    from modula.basemodel import build_model
    from modula.data.build import ensure_tokenizer
    from modula.data.tokenizer import load_tokenizer
    from modula.infra.storage import Storage

    root = tmp_path_factory.mktemp("base-data")
    cfg = config_from_dict(_raw(str(root)))
    st = Storage(cfg.storage)
    tok = load_tokenizer(st.uri(ensure_tokenizer(cfg, st)))
    out = tmp_path_factory.mktemp("tiny-base")
    build_model(cfg.model.tiny, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def s3_trained(ray_local, s3_server, tiny_base, tmp_path_factory):
    """`train --stage all` (domain experts packed in one run) on s3://, published to the registry."""
    from modula.infra.storage import Storage
    from modula.trainers.runner import train

    raw = _s3_raw(s3_server, tiny_base)
    raw["stages"]["domain"]["domains_per_run"] = 2
    cfg = config_from_dict(raw)
    storage = Storage(cfg.storage)
    storage.ensure_bucket()
    costs = train(cfg, "all", storage=storage, show_progress=False)
    return cfg, storage, costs


@pytest.mark.integration
def test_train_all_publishes_a_loadable_model_on_s3(s3_trained, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from modula.infra.registry import Registry
    from modula.model import load_modula

    cfg, storage, costs = s3_trained
    assert [c.stage for c in costs] == ["universal", "domains", "router"]
    # everything lives on the S3 server: data, Ray Train run directories, registry blobs
    keys = storage.list("")
    assert any(k.startswith("data/math/") for k in keys)
    assert any(k.startswith("runs/train/") and "checkpoint_" in k for k in keys)
    assert any(k.startswith("registry/modula/blobs/") for k in keys)
    version = Registry.from_config(cfg).show("modula")
    assert version.version == 1 and version.variant == "res"
    assert set(version.experts) == {"universal", "math", "units", "routers", "classifier"}
    assert version.experts["classifier"].kind == "classifier"
    assert version.experts["math"].training["stage"] == "domains"
    local = Registry.from_config(cfg).fetch("modula", dest=tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = load_modula(base, local.path)
    assert model.domains == ["math", "units"]
    # trained experts are no longer the zero-initialised no-op
    layer = next(iter(model.modula_layers().values()))
    assert float(layer.universal.B.abs().sum()) > 0
    assert float(layer.experts["math"].B.abs().sum()) > 0
    ids = torch.randint(0, 100, (1, 10))
    with model.capture_gates():
        out = model(input_ids=ids)
    assert torch.isfinite(out.logits).all()
    gates = next(iter(model.gate_weights().values()))
    assert gates.shape[-1] == 2 and torch.allclose(gates.sum(-1), torch.ones(1, 10), atol=1e-5)
    # the published request classifier was fitted in the router run and routes whole requests
    assert model.request_router.trained and model.request_classes == ["universal", "math", "units"]
    probs = model.request_probs(ids)
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(-1), torch.ones(1))
    # every run recorded its cost
    for c in costs:
        assert c.trainable_parameters > 0 and c.tokens > 0 and c.worker_seconds > 0
        assert c.steps == cfg.stages.get(c.stage if c.stage != "domains" else "domain").steps
    by_stage = {c.stage: c for c in costs}
    # the packed run trained exactly the two domain experts; the router run only the routers
    assert by_stage["domains"].trainable_parameters == sum(
        p.numel() for n in ("math", "units") for p in model.expert_parameters(n))
    assert by_stage["router"].trainable_parameters == sum(
        p.numel() for p in model.expert_parameters("routers")) + sum(
        p.numel() for p in model.request_router.head.parameters())
    assert 0 <= by_stage["router"].metrics["classifier_accuracy"] <= 1
    assert by_stage["router"].trainable_parameters < by_stage["universal"].trainable_parameters


@pytest.mark.integration
def test_add_domain_trains_one_expert_and_the_routers_only(s3_trained, tmp_path):
    from modula.infra.registry import Registry
    from modula.trainers.runner import add_domain

    cfg, storage, _ = s3_trained
    reg = Registry.from_config(cfg)
    before = reg.fetch("modula", dest=tmp_path / "before")
    old = {n: _sha(before.expert_path(n))
           for n in ("universal", "math", "units", "routers", "classifier")}
    version, costs = add_domain(cfg, "headlines", storage=storage, show_progress=False)
    assert version.version == 2 and version.parent == 1
    after = reg.fetch("modula", dest=tmp_path / "after")
    assert after.manifest.metadata["domains"] == ["math", "units", "headlines"]
    for n in ("universal", "math", "units"):
        assert _sha(after.expert_path(n)) == old[n], f"{n} changed"
        assert after.manifest.experts[n].version == 1
    assert _sha(after.expert_path("routers")) != old["routers"]
    assert _sha(after.expert_path("classifier")) != old["classifier"]  # one more class
    assert after.manifest.experts["headlines"].version == 2
    assert [c.stage for c in costs] == ["domains", "router"]
    assert [c.trains for c in costs] == [["headlines"], ["routers", "classifier"]]
    with pytest.raises(ValueError, match="already in modula v2"):
        add_domain(cfg, "headlines", storage=storage, show_progress=False)


def _kill_first_worker_after_checkpoint(run_dir: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL this Ray cluster's training worker once the run has written a checkpoint."""
    import os
    import signal

    import ray._private.state

    def alive_workers() -> dict[str, int]:
        # the actor table of the cluster this test is connected to (no dashboard needed)
        return {aid: a["Pid"] for aid, a in ray._private.state.actors().items()
                if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE"}

    earlier = set(alive_workers())  # workers of earlier tests' runs are not this run's
    while not stop.is_set():
        # after a few checkpoints: the controller has registered at least one by then (a
        # kill right after the first is written can beat its registration: a fresh start)
        if run_dir.is_dir() and sum(p.is_dir() and p.name.startswith("checkpoint_")
                                    for p in run_dir.iterdir()) >= 3:
            for aid, pid in alive_workers().items():
                if aid not in earlier:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            if killed:
                return
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(ray_local, tiny_base, tmp_path):
    from modula.trainers.runner import run_stage

    raw = _raw(str(tmp_path / "runs"), steps=300, checkpoint_every=10, max_failures=2)
    raw["model"]["base"] = str(tiny_base)
    cfg = config_from_dict(raw)
    (run,) = stage_runs(cfg, "universal")
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_worker_after_checkpoint,
                               args=(tmp_path / "runs/runs/train" / run.name, stop, killed))
    watcher.start()
    try:
        (cost,) = run_stage(cfg, [run], show_progress=False)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no training worker was found to kill"
    assert cost.resumed >= 1 and cost.steps == 300
    # the same run uninterrupted, under another name
    cfg2 = config_from_dict({**raw, "storage": {"root": str(tmp_path / "runs2")}})
    (run2,) = stage_runs(cfg2, "universal")
    (clean,) = run_stage(cfg2, [run2], show_progress=False)
    assert clean.resumed == 0
    assert abs(cost.final_loss - clean.final_loss) < 0.1 * clean.final_loss


@pytest.mark.integration
def test_corrupt_checkpoint_or_expert_fails_clearly(ray_local, tiny_base, tmp_path):
    from modula.model import ExpertFileError
    from modula.trainers import StageError, publish, run_stage

    raw = _raw(str(tmp_path / "runs"), steps=4, max_failures=0)
    raw["model"]["base"] = str(tiny_base)
    cfg = config_from_dict(raw)
    (run,) = stage_runs(cfg, "universal")
    run_stage(cfg, [run], show_progress=False)
    run_dir = tmp_path / "runs/runs/train" / run.name
    latest = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))[-1]
    (latest / "optimizer.safetensors").write_bytes(b"garbage")
    # the same run again resumes from its latest checkpoint, which is corrupt: an error, not a
    # silent fresh start
    with pytest.raises(StageError, match="optimizer.safetensors is corrupt"):
        run_stage(cfg, [run], show_progress=False)
    # a damaged expert file in the workspace refuses to publish
    work = tmp_path / "runs/work/modula/res"
    (work / "universal.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((ExpertFileError, StageError)):
        publish(cfg)
    with pytest.raises(StageError, match="no expert has been trained for flan"):
        publish(config_from_dict({**raw, "modula": {"variant": "flan"}}))
    (work / "universal.safetensors").unlink()
    with pytest.raises(StageError, match="expert 'universal' has not been trained"):
        publish(cfg)
    assert json.loads((work / "costs" / f"{run.name}.json").read_text())["steps"] == 4
