"""Training on several nodes: the stages' workers on worker nodes read what they need from S3
themselves, side-by-side domain runs land on different nodes, the run records say where each
ran, a data-parallel run spreads (or packs) its workers, and a run that loses a node in the
middle resumes from its last checkpoint on the nodes left and ends where an uninterrupted
run ends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from multinode_helpers import actor_nodes

from modula.config import config_from_dict

# a multi-node run starts a worker process per node and run: slow on a busy 2-core machine
pytestmark = [pytest.mark.integration, pytest.mark.multinode, pytest.mark.timeout(1500)]

TINY = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}
SPLITS = {"train": 48, "validation": 16, "test": 8}
# every worker of every stage needs one `trainer`: only worker nodes have it, never the head
ON_TRAINERS = {"num_workers": 1, "cpus_per_worker": 1, "custom_resources": {"trainer": 1}}


@pytest.fixture(scope="module")
def s3(s3_server, s3_module):
    """(the storage section, a Storage) on a fresh bucket of the loopback S3 server."""
    return s3_module(s3_server)


def _raw(storage: dict, base: str, steps: int = 3, **stage_extra: Any) -> dict:
    stage = {"steps": steps, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
             "max_failures": 2, "scaling": dict(ON_TRAINERS), **stage_extra}
    return {
        "storage": storage,
        "cluster": {"address": "auto", "dashboard": False},
        "model": {"base": base, "tiny": TINY, "max_length": 96},
        "domains": [{"name": n, "splits": SPLITS} for n in ("general", "math", "units")],
        "stages": {s: dict(stage) for s in ("universal", "domain", "router")},
    }


@pytest.fixture(scope="module")
def base(s3, tmp_path_factory) -> str:
    """A tiny random Llama with the built-in tokenizer, stored in S3 only: every node loads it
    from there (``model.base: s3://...``) into its own cache."""
    from modula.basemodel import build_model
    from modula.data.build import ensure_tokenizer
    from modula.data.tokenizer import load_tokenizer

    section, st = s3
    cfg = config_from_dict(_raw(section, "builtin:tiny"))
    tok = load_tokenizer(st.local_dir(ensure_tokenizer(cfg, st), tmp_path_factory.mktemp("tok")))
    out = tmp_path_factory.mktemp("tiny-base")
    build_model(cfg.model.tiny, tok).save_pretrained(out)
    tok.save_pretrained(out)
    st.upload_dir(out, "base")
    return st.uri("base")


def _where(costs: list[Any]) -> dict[tuple[str, ...], list[str]]:
    return {tuple(c.trains): [n["node_id"] for n in c.nodes] for c in costs}


def test_stages_on_worker_nodes_read_their_inputs_from_s3(nodes, s3, base, tmp_path):
    """Two domain experts side by side, then the router, every worker on a worker node (the
    head has no `trainer`): the runs load the earlier experts from S3 on their own node (the
    universal expert, and for the router the domain experts the other runs left there); the
    two domain runs take different nodes; the cost records and the published manifest say
    where each run ran."""
    from modula.infra.registry import Registry
    from modula.trainers.plan import stage_runs
    from modula.trainers.runner import train

    section, st = s3
    cfg = config_from_dict(_raw(section, base))
    _store_universal(cfg, st, tmp_path)
    a = nodes.add("a", num_cpus=2, resources={"trainer": 1})
    b = nodes.add("b", num_cpus=2, resources={"trainer": 1})
    costs = train(cfg, "domains", storage=st, show_progress=False)
    costs += train(cfg, "router", storage=st, show_progress=False)  # publishes
    where = _where(costs)
    assert list(where) == [("math",), ("units",), ("routers", "classifier")]
    for trains, ids in where.items():
        assert len(ids) == 1 and ids[0] in (a, b), (trains, [nodes.name_of(i) for i in ids])
    assert {where[("math",)][0], where[("units",)][0]} == {a, b}  # side by side, two nodes
    assert stage_runs(cfg, "router")[0].inputs == ("universal", "math", "units")
    # every worker node loaded the base model from S3 into its own temporary folder
    for name in ("a", "b"):
        assert list(nodes.tmpdir(name).glob("modula-cache/*/config.json")), name
    # the published version records where every expert was trained, and its own run
    mv = Registry.from_config(cfg).show("modula")
    runs = {"math": ("math",), "units": ("units",), "routers": ("routers", "classifier"),
            "classifier": ("routers", "classifier")}
    for name, run in runs.items():
        assert [n["node_id"] for n in mv.experts[name].training["nodes"]] == where[run]
    (router_run,) = mv.metadata["runs"]
    assert [n["node_id"] for n in router_run["nodes"]] == where[("routers", "classifier")]
    assert router_run["nodes"][0]["ip"]
    stored = {c.run: c for c in costs}
    for rec in (json.loads(st.read_text(k)) for k in st.list("work/modula/res/costs")):
        assert rec["nodes"] == stored[rec["run"]].nodes and rec["node_history"]


def _store_universal(cfg: Any, st: Any, tmp_path: Path) -> None:
    """The universal expert in the workspace, as the universal stage leaves it (untrained: the
    runs here only need one to load)."""
    from modula.model import save_expert
    from modula.trainers.loop import build_stage_model
    from modula.trainers.plan import stage_runs

    (uni,) = stage_runs(cfg, "universal")
    save_expert(build_stage_model(cfg, uni, {}), "universal", tmp_path / "u.safetensors")
    st.upload_file(tmp_path / "u.safetensors", "work/modula/res/universal.safetensors")


def _heldout_loss(cfg: Any, st: Any, expert: Path | None) -> float:
    """Mean response loss (nats per token) of base + universal expert on general's held-out
    split: a fixed set, the same for every run compared."""
    from modula.basemodel import load_base_model
    from modula.data.io import read_records
    from modula.eval.evaluate import response_nll
    from modula.model import attach_modula, load_expert

    base, tok = load_base_model(cfg, st)
    model = attach_modula(base, cfg.modula, domains=cfg.expert_domains())
    if expert is not None:
        load_expert(model, "universal", expert)
    model.eval()
    total, count = response_nll(model, tok, read_records(st, "general", "validation"),
                                cfg.model.max_length)
    return total / count


def _remove_a_node_mid_run(nodes: Any, st: Any, run_key: str, names: list[str],
                           stop: threading.Event, out: dict) -> None:
    """Once the run has two checkpoints in S3, remove (abruptly) a worker node that hosts one
    of its workers."""
    while not stop.is_set():
        ckpts = {k.split("/")[len(run_key.split("/"))] for k in st.list(run_key)
                 if "/checkpoint_" in k}
        workers = set(actor_nodes(class_name="RayTrainWorker").values())
        if len(ckpts) >= 2 and workers:
            victim = next((n for n in names if nodes.id(n) in workers), None)
            if victim is not None:
                out["removed"], out["node_id"] = victim, nodes.id(victim)
                out["at_checkpoints"] = len(ckpts)
                nodes.remove(victim)
                return
        time.sleep(0.1)


def test_a_run_spreads_and_finishes_after_losing_a_node(nodes, s3, base, tmp_path):
    """A two-worker data-parallel run: `pack` puts both workers on one node, `spread` on two.
    The spread run loses one of its nodes after its second checkpoint; Ray Train restarts the
    worker group on the node left, the loop resumes from the last checkpoint, and the run ends
    with a held-out loss within 10 % of the uninterrupted (packed) run's."""
    from modula.trainers.plan import stage_runs
    from modula.trainers.runner import run_datasets, run_stage

    c = nodes.add("c", num_cpus=2, resources={"trainer": 2})
    d = nodes.add("d", num_cpus=2, resources={"trainer": 2})
    section, st = s3
    scaling = {"num_workers": 2, "cpus_per_worker": 1, "custom_resources": {"trainer": 1}}
    raw = _raw(section, base, steps=60, checkpoint_every=10, warmup_steps=5, batch_size=8,
               lr=3e-3, scaling=scaling)
    packed = config_from_dict(raw)
    raw["stages"]["universal"]["scaling"] = {**scaling, "placement": "spread"}
    spread = config_from_dict(raw)

    (ref_run,) = stage_runs(packed, "universal", name="ref")
    data = run_datasets(packed, ref_run, st)  # the same tokenised rows for both runs
    (ref,) = run_stage(packed, [ref_run], st, name="ref", show_progress=False, datasets=data)
    assert ref.resumed == 0 and len(ref.nodes) == 2
    assert len({n["node_id"] for n in ref.nodes}) == 1 and ref.nodes[0]["node_id"] in (c, d)

    (run,) = stage_runs(spread, "universal", name="lost")
    stop, out = threading.Event(), {}
    watcher = threading.Thread(target=_remove_a_node_mid_run, args=(
        nodes, st, f"runs/train/{run.name}", ["c", "d"], stop, out))
    watcher.start()
    try:
        (cost,) = run_stage(spread, [run], st, name="lost", show_progress=False,
                            datasets=data)
    finally:
        stop.set()
        watcher.join()
    assert "removed" in out, "the run ended before a node could be removed"
    lost = out["node_id"]
    assert cost.steps == 60 and cost.resumed >= 1
    first, last = cost.node_history[0], cost.node_history[-1]
    assert sorted(first) == sorted([c, d])  # spread: one worker on each node
    assert lost not in last and set(last) <= {c, d}  # resumed on the node left
    assert [n["node_id"] for n in cost.nodes] == last

    ref_dir, lost_dir = tmp_path / "ref", tmp_path / "lost"
    ref_file = st.download_file("work/ref/res/universal.safetensors", ref_dir / "u.safetensors")
    lost_file = st.download_file("work/lost/res/universal.safetensors",
                                 lost_dir / "u.safetensors")
    before = _heldout_loss(packed, st, None)
    ref_loss = _heldout_loss(packed, st, ref_file)
    lost_loss = _heldout_loss(packed, st, lost_file)
    print(f"held-out loss: base {before:.4f}, uninterrupted {ref_loss:.4f}, "
          f"lost {out['removed']} after {out['at_checkpoints']} checkpoints {lost_loss:.4f}; "
          f"train loss {ref.final_loss:.4f} / {cost.final_loss:.4f}")
    # Same seed, steps, schedule and data; the interrupted run redoes the steps after its last
    # checkpoint on a new shuffle (the seed includes the step) and a new split of the rows
    # between its workers, so it is not bit-identical. Held-out loss on a fixed set (not the
    # last batch's loss) makes the comparison fair. The 10 % bound is the requirement; the
    # second check gives it teeth: a random tiny base learns little in 60 steps (loss ~6.24 ->
    # ~6.17), so the interrupted run must also have learned about as much as the clean one.
    assert abs(lost_loss - ref_loss) <= 0.10 * ref_loss
    gain_ref, gain_lost = before - ref_loss, before - lost_loss
    assert gain_ref > 0.02 and abs(gain_lost - gain_ref) <= 0.25 * gain_ref
