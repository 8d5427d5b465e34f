"""Training at scale, Ray-free: activation checkpointing and gradient accumulation give the plain
step's gradients (fp32, 1e-5), the bf16 / fp16 paths run over float32 master weights, the
config's switches and their checks, and ``kernel: auto`` choosing Triton only for CUDA tensors
(the missing GPU is the one thing faked)."""

from __future__ import annotations

import sys

import pytest
import torch

from modula.config import ModulaLayerConfig, config_from_dict
from modula.config.loader import ConfigError
from modula.model import attach_modula
from modula.trainers.common import accumulated_step, batch_line, grad_scaler

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_model(variant: str = "res", seed: int = 0, dtype=torch.float32):
    """A 2-layer random Llama with MoDULA (two domains), every adapter non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128))
    base = base.to(dtype)
    model = attach_modula(base, ModulaLayerConfig(variant=variant, universal_rank=8,
                                                  domain_rank=4), ["a", "b"],
                          adapter_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    return model


def packed_batch(rows: int, length: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows as the trainers see them: two examples a row (restarting positions), the
    prompt halves masked out of the labels, so micro-batches hold different label counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    labels = ids.clone()
    pos = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).repeat(rows, 1)
    for r in range(rows):
        cut = int(torch.randint(1, length // 2 - 1, (1,), generator=g))
        labels[r, :cut] = -100
        labels[r, length // 2: length // 2 + r % 3] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, batches, pins=None, **kw):
    """One accumulated step through the trainers' code; lr 0, no clipping: the gradients stay
    readable and the weights unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)

    def forward(batch, s):
        extra = {}
        if pins is not None:
            extra["expert_ids"] = torch.full((batch["input_ids"].shape[0],), pins[s])
        return model(**batch, **extra, use_cache=False)

    loss, _ = accumulated_step(forward, batches, opt, params, max_grad_norm=None, **kw)
    return loss, grads(model)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], **TOL, msg=n)


# ------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("stage", ["router", "domain:b", "packed"])
def test_checkpointed_step_gives_the_plain_gradients(stage, one_torch_thread):
    """Decoder layers recomputed in the backward give the plain step's gradients, also with
    rows pinned to experts (a packed domain run): the recomputation sees its forward's pins."""
    batch = packed_batch(4)
    pins = None
    results = []
    for checkpointed in (False, True):
        model = tiny_model()
        if stage == "packed":
            model.set_stage(None)
            for name in ("a", "b"):
                for p in model.expert_parameters(name):
                    p.requires_grad_(True)
            pins = [0, 1]
            batches = [[batch, packed_batch(4, seed=1)]]
        else:
            model.set_stage(stage)
            batches = [[batch]]
        calls = []
        layer = next(iter(model.modula_layers().values()))
        layer.register_forward_hook(lambda *_, _calls=calls: _calls.append(1))
        if checkpointed:
            model.enable_activation_checkpointing()
        results.append(step(model, batches, pins))
        # recomputed: each forward of the layer runs twice
        assert len(calls) == len(batches[0]) * (2 if checkpointed else 1)
    (loss_plain, g_plain), (loss_ckpt, g_ckpt) = results
    assert loss_plain == pytest.approx(loss_ckpt, rel=1e-6)
    assert_same(g_plain, g_ckpt)


def test_checkpointing_captures_gates_once(one_torch_thread):
    model = tiny_model()
    model.set_stage("router")
    model.enable_activation_checkpointing()
    batch = packed_batch(2)
    with model.capture_gates():
        model(**batch, use_cache=False).loss.backward()
        gates = model.gate_weights()
    assert gates and all(g.shape == (2, 24, 2) for g in gates.values())


# ------------------------------------------------------------------------------ accumulation


def test_accumulated_step_gives_the_plain_gradients(one_torch_thread):
    """Four rows in one batch, or two micro-batches of two, or four of one: the same step
    (micro-batch losses weighted by their label tokens)."""
    whole = packed_batch(4)
    parts = {k: v.split(1) for k, v in whole.items()}

    def micro(size):
        return [[{k: torch.cat(parts[k][i:i + size]) for k in whole}] for i in range(0, 4, size)]

    model = tiny_model()
    model.set_stage("universal")
    loss_plain, g_plain = step(model, micro(4))
    for size in (2, 1):
        loss, g = step(model, micro(size))
        assert loss == pytest.approx(loss_plain, rel=1e-5)
        assert_same(g_plain, g)
    # two streams (a packed domain run): each stream accumulated on its own
    model.set_stage(None)
    for p in model.expert_parameters("a") + model.expert_parameters("b"):
        p.requires_grad_(True)
    other = packed_batch(4, seed=5)
    both = step(model, [[whole, other]], pins=[0, 1])
    split = step(model, [[{k: v[:2] for k, v in whole.items()}, {k: v[:2] for k, v in other.items()}],
                         [{k: v[2:] for k, v in whole.items()}, {k: v[2:] for k, v in other.items()}]],
                 pins=[0, 1])
    assert both[0] == pytest.approx(split[0], rel=1e-5)
    assert_same(both[1], split[1])


# ------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_step_runs_over_fp32_masters(precision, one_torch_thread):
    """Autocast on the CPU: the loss is the fp32 one within low-precision rounding, the trained
    experts stay float32 and move; fp16 goes through the loss scaler."""
    batch = packed_batch(4)
    model = tiny_model()
    model.set_stage("router")
    loss32, g32 = step(model, [[batch]])
    model = tiny_model()
    model.set_stage("router")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = grad_scaler(precision, "cpu")
    assert (scaler is not None) == (precision == "fp16")
    loss, norm = accumulated_step(lambda b, _: model(**b, use_cache=False), [[batch]], opt,
                                  params, precision=precision, scaler=scaler)
    assert loss == pytest.approx(loss32, rel=3e-2) and norm > 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert not torch.equal(p.detach(), before[n]), f"{n} did not train"
            # the low-precision gradient points the way of the fp32 one
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g32[n].flatten(), 0)
            assert cos > 0.98, n
    if scaler is not None:
        assert scaler.state_dict()["scale"] > 0


def test_bf16_base_with_fp32_experts(one_torch_thread):
    """A bf16 base model (model.dtype) under bf16 autocast trains float32 experts."""
    model = tiny_model(dtype=torch.bfloat16)
    model.set_stage("universal")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss, _ = accumulated_step(lambda b, _: model(**b, use_cache=False),
                               [[packed_batch(2)]], opt, params, precision="bf16")
    assert loss == loss and all(p.grad.dtype == torch.float32 for p in params)


# ------------------------------------------------------------------------------ config


def test_the_switches_and_their_checks():
    cfg = config_from_dict({"stages": {
        "universal": {"precision": "bf16", "gradient_checkpointing": True, "grad_accum_steps": 4,
                      "batch_size": 8, "scaling": {"num_workers": 2}}}})
    st = cfg.stages.universal
    assert (st.precision, st.gradient_checkpointing, st.grad_accum_steps) == ("bf16", True, 4)
    assert st.effective_batch == 4 * 4 * 2
    line = batch_line(st, 1024)
    assert "effective batch 32 rows of 1024 tokens = 4 per worker x 4 accumulated x 2" in line
    assert cfg.stages.router.precision == "fp32"  # every stage has its own switches
    bad = [({"stages": {"lora": {"precision": "fp8"}}}, "stages.lora.precision"),
           ({"stages": {"molora": {"grad_accum_steps": 0}}}, "stages.molora.grad_accum_steps"),
           ({"model": {"max_length": 4096}}, "model.max_length: 4096 tokens is beyond"),
           ({"stages": {"domain": {"max_length": 1024}}}, "stages.domain.max_length")]
    for raw, where in bad:
        with pytest.raises(ConfigError) as info:
            config_from_dict(raw)
        assert where in str(info.value)
    # the built-in model's context can grow with it
    ok = config_from_dict({"model": {"max_length": 4096,
                                     "tiny": {"max_position_embeddings": 4096}}})
    assert ok.max_lengths() == {"model.max_length": 4096}


# ------------------------------------------------------------------------------ kernel: auto


def test_auto_picks_triton_only_for_cuda_tensors(monkeypatch, one_torch_thread):
    """The choice itself, with only the GPU faked: a "CUDA" tensor (the device seam) runs the
    Triton kernels (interpreted on this CPU) and matches the reference; a CPU tensor, or no
    Triton, runs the stacked torch path."""
    pytest.importorskip("triton")
    from modula.kernels import mixture

    calls: list[str] = []
    for name in ("triton_mixture", "stacked_mixture"):
        real = getattr(mixture, name)
        monkeypatch.setattr(mixture, name,
                            lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    model = tiny_model()
    model.eval()
    batch = packed_batch(2)
    with torch.no_grad():
        model.kernel_backend = "reference"
        want = model(input_ids=batch["input_ids"]).logits
        model.kernel_backend = "auto"
        model(input_ids=batch["input_ids"])
        assert set(calls) == {"stacked_mixture"}, "a CPU tensor must take the stacked path"
        calls.clear()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(mixture, "_on_cuda", lambda x: True)
        got = model(input_ids=batch["input_ids"]).logits
        assert set(calls) == {"triton_mixture"}
        torch.testing.assert_close(got, want, **TOL)
        calls.clear()
        monkeypatch.setitem(sys.modules, "triton", None)  # Triton not installed
        model(input_ids=batch["input_ids"])
        assert set(calls) == {"stacked_mixture"}


# ------------------------------------------------------------------------------ devices


def test_gpu_workers_and_gpu_replicas_are_asked_for(tmp_path):
    """GPU scaling reaches Ray Train's ScalingConfig; an expert replica with a GPU runs on cuda
    in bf16 (the Triton kernels' dtype), a CPU replica or the Router in model.dtype."""
    from modula.infra.storage import Storage
    from modula.serving.modeling import ModelSource, ModelUnavailable, replica_placement
    from modula.serving.topology import deployment_options
    from modula.trainers.plan import stage_runs
    from modula.trainers.runner import _trainer

    cfg = config_from_dict({"storage": {"root": str(tmp_path)}, "stages": {"universal": {
        "scaling": {"num_workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 1}}}})
    (run,) = stage_runs(cfg, "universal")
    sc = _trainer(cfg, run, Storage(cfg.storage), {}, None, None, 0, False).scaling_config
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker) == (2, True,
                                                                     {"CPU": 4.0, "GPU": 1.0})

    gpu = config_from_dict({"storage": {"root": str(tmp_path)},
                            "serve": {"resources": {"num_gpus": 1}}})
    assert replica_placement(gpu) == ("cuda", torch.bfloat16)
    assert replica_placement(gpu, on_gpu=False) == ("cpu", torch.float32)  # the Router
    assert deployment_options(gpu)["Experts"]["ray_actor_options"]["num_gpus"] == 1
    fp16 = gpu.model_copy(update={"serve": gpu.serve.model_copy(update={"dtype": "float16"})})
    assert replica_placement(fp16) == ("cuda", torch.float16)
    assert replica_placement(config_from_dict({"model": {"dtype": "bfloat16"}})) == \
        ("cpu", torch.bfloat16)
    if not torch.cuda.is_available():  # a GPU replica that sees none says so
        with pytest.raises(ModelUnavailable, match="sees no CUDA device"):
            ModelSource(gpu).load(1)


def test_a_replica_serves_in_another_dtype_than_it_was_trained(tmp_path, one_torch_thread):
    """Experts published against a float32 base, served in bfloat16 (``serve.dtype``, what a
    GPU replica does by default): the base fingerprint is checked in the published dtype, then
    the weights are cast; rotary frequencies stay float32."""
    from serving_fixtures import make_base_model, publish_model, serving_config

    from modula.serving.engine import EngineCore, Finished
    from modula.serving.modeling import ModelSource
    from modula.serving.protocol import GenerationRequest, SamplingParams

    make_base_model(tmp_path / "base")
    cfg = serving_config(tmp_path / "runs", tmp_path / "base", dtype="bfloat16")
    version, _ = publish_model(cfg, ["code", "math"])
    adapter = ModelSource(cfg).load(version)
    model = adapter.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    events = []
    core = EngineCore(adapter, ModelSource(cfg).tokenizer())
    core.add(GenerationRequest("r", (5, 6, 7, 8), SamplingParams(max_tokens=3, temperature=0,
                                                                 ignore_eos=True), "math"),
             adapter.expert_id("math"), events.append)
    while core.has_work():
        core.step()
    assert [e for e in events if isinstance(e, Finished)][0].result.completion_tokens == 3
