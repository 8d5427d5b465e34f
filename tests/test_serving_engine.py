"""The generation engine, Ray-free: continuous batching over tiny random HF causal LMs and a
MoDULA model, checked token for token against Hugging Face ``generate`` run one request at a
time; stop sequences, eos, seeds, cancellation, failures, the incremental detokeniser."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serving_fixtures import make_base_model, randomize_experts

from modula.serving.engine import (
    AsyncEngine,
    EngineCore,
    Failed,
    Finished,
    ModelAdapter,
    TokenDelta,
    collect,
)
from modula.serving.protocol import APIError, GenerationRequest, SamplingParams
from modula.serving.sampling import make_generator, sample_next
from modula.serving.text import TextTracker

PROMPTS = [
    "The quick brown fox",
    "In Python, a function",
    "x",
    "Numbers and arithmetic operations are described here in great detail, with examples",
    "Class definitions",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run best on one intra-op thread, and a shared 2-core machine makes two
    OpenMP threads wait for each other at every small op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-base")
    model, tok = make_base_model(path)
    return path, model, tok


def attached(base, variant: str, seed: int):
    """The base model (loaded afresh) with random MoDULA experts of `variant`, and the
    tokenizer."""
    from transformers import AutoModelForCausalLM

    from modula.config import ModulaLayerConfig
    from modula.model import attach_modula

    path, _, tok = base
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    mm = attach_modula(hf, ModulaLayerConfig(variant=variant, universal_rank=8, domain_rank=4),
                       ["code", "math", "units"])
    randomize_experts(mm, seed=seed)
    mm.eval()
    return mm, tok


@pytest.fixture(scope="module")
def modula(base):
    return attached(base, "res", 3)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def request(tok, i: int, prompt: str, params: SamplingParams, domain: str | None = None):
    return GenerationRequest(f"r{i}", tuple(tok(prompt)["input_ids"]), params, domain)


def solo_generate(model, tok, prompt: str, n: int, expert_ids=None) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = {} if expert_ids is None else {"expert_ids": expert_ids}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


class Recorder:
    """A sink per request id that records its events."""

    def __init__(self):
        self.events: dict[str, list] = {}

    def sink(self, rid: str):
        self.events[rid] = []
        return self.events[rid].append

    def result(self, rid: str):
        done = [e for e in self.events[rid] if isinstance(e, Finished)]
        return done[0].result if done else None

    def text(self, rid: str) -> str:
        out = "".join(e.text for e in self.events[rid] if isinstance(e, TokenDelta))
        return out + "".join(e.last_delta for e in self.events[rid] if isinstance(e, Finished))


def run_until_idle(core: EngineCore, limit: int = 500) -> None:
    for _ in range(limit):
        if not core.has_work():
            return
        core.step()
    raise AssertionError("engine did not finish")


# ------------------------------------------------------------------------------ batching


def test_continuous_batching_matches_one_at_a_time(base):
    """Requests join a running batch at different steps, with different prompt lengths and
    max_tokens; every row's tokens equal HF generate run alone."""
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok, max_running=8)
    rec = Recorder()
    lengths = [12, 7, 20, 5, 9]
    reqs = [request(tok, i, p, greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))]
    core.add(reqs[0], -1, rec.sink("r0"))
    core.step()
    core.step()
    core.add(reqs[1], -1, rec.sink("r1"))
    core.add(reqs[2], -1, rec.sink("r2"))
    core.step()
    core.add(reqs[3], -1, rec.sink("r3"))
    for _ in range(4):
        core.step()
    core.add(reqs[4], -1, rec.sink("r4"))
    run_until_idle(core)
    for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        res = rec.result(f"r{i}")
        assert res.token_ids == solo_generate(model, tok, p, n), f"row {i} differs"
        assert res.finish_reason == "length" and res.completion_tokens == n
        assert res.prompt_tokens == len(reqs[i].prompt_ids)
        assert rec.text(f"r{i}") == res.text == tok.decode(res.token_ids, skip_special_tokens=True)
    assert core.stats.max_batch >= 3
    assert core._cache is None and core._mask is None  # nothing left behind


def test_one_prefill_forward_per_admission_group(base):
    _, model, tok = base
    adapter = ModelAdapter(model)
    calls = []
    real = adapter.forward

    def counting(ids, *a, **kw):
        calls.append(tuple(ids.shape))
        return real(ids, *a, **kw)

    adapter.forward = counting
    core = EngineCore(adapter, tok, max_running=8)
    rec = Recorder()
    for i, p in enumerate(PROMPTS[:4]):
        core.add(request(tok, i, p, greedy(3)), -1, rec.sink(f"r{i}"))
    core.step()
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS[:4])
    assert calls[0] == (4, longest)  # the four prompts in one forward, left-padded
    assert calls[1] == (4, 1)  # then one decode forward for all four rows
    run_until_idle(core)
    assert core.stats.prefills == 1 and core.stats.prefill_rows == 4


def test_max_running_queues_the_rest(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok, max_running=2)
    rec = Recorder()
    for i, p in enumerate(PROMPTS):
        core.add(request(tok, i, p, greedy(4)), -1, rec.sink(f"r{i}"))
    core.step()
    assert core.running == 2 and core.queued == 3
    run_until_idle(core)
    assert core.stats.max_batch == 2
    for i, p in enumerate(PROMPTS):
        assert rec.result(f"r{i}").token_ids == solo_generate(model, tok, p, 4)


def test_finished_rows_leave_and_the_cache_is_trimmed(base):
    """A long prompt that finishes early must not keep its padding columns in the batch."""
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok, max_running=8)
    rec = Recorder()
    long_p, short_p = PROMPTS[3], PROMPTS[2]
    core.add(request(tok, 0, long_p, greedy(2)), -1, rec.sink("r0"))
    core.add(request(tok, 1, short_p, greedy(15)), -1, rec.sink("r1"))
    core.step()
    core.step()
    assert rec.result("r0") is not None and core.running == 1
    # only the short row's own tokens are left in the time axis
    assert core._mask.shape[1] == int(core._mask.sum()) == len(tok(short_p)["input_ids"]) + 2
    run_until_idle(core)
    assert rec.result("r1").token_ids == solo_generate(model, tok, short_p, 15)


def test_mixed_domains_in_one_batch_and_gates(modula):
    """Rows pinned to different domains and routed rows share every forward; each equals the
    MoDULA model's own generate for that row alone; the gates are reported per request."""
    mm, tok = modula
    from modula.serving.modeling import modula_adapter

    adapter = modula_adapter(mm, version=7)
    core = EngineCore(adapter, tok, max_running=8)
    rec = Recorder()
    cases = [(PROMPTS[0], None), (PROMPTS[1], "code"), (PROMPTS[2], "math"),
             (PROMPTS[3], "units"), (PROMPTS[0], "code"), (PROMPTS[4], None)]
    for i, (p, d) in enumerate(cases):
        core.add(request(tok, i, p, greedy(4 + i), d), adapter.expert_id(d), rec.sink(f"r{i}"))
        if i % 2:
            core.step()
    run_until_idle(core)
    outs = {}
    for i, (p, d) in enumerate(cases):
        res = rec.result(f"r{i}")
        eid = [-1 if d is None else mm.domains.index(d)]
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.inference_mode(), mm.capture_gates():
            ref = mm.generate(ids, max_new_tokens=4 + i, do_sample=False, eos_token_id=None,
                              pad_token_id=0, expert_ids=eid)
            ref_gates = mm.mean_gates()[0].tolist()
        assert res.token_ids == ref[0, ids.shape[1]:].tolist(), f"row {i} ({d}) differs"
        assert list(res.gates) == ["code", "math", "units"]
        assert list(res.gates.values()) == pytest.approx(ref_gates, abs=1e-4)
        assert sum(res.gates.values()) == pytest.approx(1.0, abs=1e-4)
        if d is not None:
            assert res.gates[d] == pytest.approx(1.0)
        assert res.domain == d and res.info["version"] == 7
        outs[(p, d)] = res.token_ids
    # the domain really changes the output, so pinning is not a no-op
    assert outs[(PROMPTS[0], None)] != outs[(PROMPTS[0], "code")]
    with pytest.raises(KeyError):
        adapter.expert_id("finance")


def test_gate_report_prompt_or_off(modula):
    """By default the gates cover the prompt (captured in the prefill forward, no cost per
    decode step); "off" reports none."""
    mm, tok = modula
    from modula.serving.modeling import modula_adapter

    adapter = modula_adapter(mm)
    ids = tok(PROMPTS[3], return_tensors="pt")["input_ids"]
    with torch.inference_mode(), mm.capture_gates():
        mm(input_ids=ids)
        ref = mm.mean_gates()[0].tolist()
    for mode, want in (("prompt", ref), ("off", None)):
        core = EngineCore(adapter, tok, gate_report=mode)
        rec = Recorder()
        core.add(request(tok, 0, PROMPTS[3], greedy(5)), -1, rec.sink("r0"))
        core.add(request(tok, 1, PROMPTS[0], greedy(5), "math"), 1, rec.sink("r1"))
        run_until_idle(core)
        res = rec.result("r0")
        if want is None:
            assert res.gates is None and rec.result("r1").gates is None
        else:
            assert list(res.gates.values()) == pytest.approx(want, abs=1e-4)
            assert res.info["gates_over"] == "prompt"
            assert rec.result("r1").gates["math"] == pytest.approx(1.0)


COMPILE_CASES = [(PROMPTS[0], None), (PROMPTS[1], "code"), (PROMPTS[4], None),
                 (PROMPTS[3], "math")]


def serve_compile_cases(adapter, tok) -> list[list[int]]:
    """The tokens of COMPILE_CASES, admitted at different steps (rows join and leave)."""
    # the serving default: gates over the prompt (a step that captures them runs eager)
    core = EngineCore(adapter, tok, max_running=8, gate_report="prompt")
    rec = Recorder()
    for i, (p, d) in enumerate(COMPILE_CASES):
        core.add(request(tok, i, p, greedy(3 + 2 * i), d), adapter.expert_id(d),
                 rec.sink(f"r{i}"))
        if i % 2:
            core.step()
    run_until_idle(core)
    return [rec.result(f"r{i}").token_ids for i in range(len(COMPILE_CASES))]


def test_the_compiled_step_serves_the_eager_tokens(modula, monkeypatch):
    """serve.compile: decode, with torch.compile as the identity and the layers on their
    traced branch (the compiled graph's code, run eager; tests/test_model_compiled.py compiles
    for real): the same tokens as eager, every decode step through the compiled step."""
    mm, tok = modula
    from modula.model import inference as inference_mod
    from modula.serving.modeling import modula_adapter

    want = serve_compile_cases(modula_adapter(mm), tok)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(inference_mod, "_traced", lambda: True)
    adapter = modula_adapter(mm, compile="decode")
    assert serve_compile_cases(adapter, tok) == want
    assert mm.compiled_decode.compiled_calls > 0 and mm.compiled_decode.failure is None
    mm.prepare_inference()  # the module's other tests serve eager


def test_a_failing_compile_fails_no_request(modula, monkeypatch):
    """serve.compile: decode with a compiler that fails when the step runs: the engine serves
    the same tokens as eager (the decode steps ran eager after one warning)."""
    mm, tok = modula
    from modula.serving.modeling import modula_adapter

    want = serve_compile_cases(modula_adapter(mm), tok)

    def compile_that_fails_when_run(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails_when_run)
    adapter = modula_adapter(mm, compile="decode")
    assert serve_compile_cases(adapter, tok) == want
    assert "no C++ compiler" in mm.compiled_decode.failure
    mm.prepare_inference()  # the module's other tests serve eager


# ------------------------------------------------------------------------------ stopping


def test_stop_sequence_cuts_the_text_and_is_never_streamed(base):
    _, model, tok = base
    ref = tok.decode(solo_generate(model, tok, PROMPTS[1], 30), skip_special_tokens=True)
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    assert stop and stop in ref
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[1], greedy(30, stop=("zzzz-never", stop))), -1,
             rec.sink("r0"))
    run_until_idle(core)
    res = rec.result("r0")
    assert res.finish_reason == "stop"
    assert res.text == ref[:ref.index(stop)]
    assert rec.text("r0") == res.text
    assert all(stop not in e.text for e in rec.events["r0"] if isinstance(e, TokenDelta))


def test_eos_ends_a_request(base):
    _, model, tok = base
    tokens = solo_generate(model, tok, PROMPTS[0], 6)
    core = EngineCore(ModelAdapter(model), tok)
    core.eos_ids = {tokens[3]}
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0)), -1,
             rec.sink("r0"))
    run_until_idle(core)
    res = rec.result("r0")
    first = tokens.index(tokens[3])
    assert res.finish_reason == "stop" and res.token_ids == tokens[:first]


def test_max_tokens_one_and_context_limit(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok, max_context=len(tok(PROMPTS[0])["input_ids"]) + 4)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[0], greedy(1)), -1, rec.sink("a"))
    core.add(request(tok, 1, PROMPTS[0], greedy(40)), -1, rec.sink("b"))
    run_until_idle(core)
    assert rec.result("a").completion_tokens == 1 and rec.result("a").finish_reason == "length"
    b = rec.result("b")
    assert b.finish_reason == "length" and b.completion_tokens == 4
    with pytest.raises(APIError) as info:
        core.add(request(tok, 2, PROMPTS[3], greedy(2)), -1, rec.sink("c"))
    assert info.value.code == "context_length_exceeded"


def test_bad_token_ids_are_refused(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok)
    bad = GenerationRequest("r", (1, 2, len(tok) + 5), greedy(2))
    with pytest.raises(APIError) as info:
        core.add(bad, -1, lambda e: None)
    assert info.value.status == 400
    assert not core.has_work()


# ------------------------------------------------------------------------------ sampling


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(base):
    _, model, tok = base
    params = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.95, seed=1234,
                            ignore_eos=True)

    def run(companions: int, seed: int = 1234):
        core = EngineCore(ModelAdapter(model), tok)
        rec = Recorder()
        core.add(request(tok, 0, PROMPTS[0], SamplingParams(**{**params.__dict__, "seed": seed})),
                 -1, rec.sink("r0"))
        for i in range(companions):
            core.add(request(tok, i + 1, PROMPTS[i % 4 + 1],
                             SamplingParams(max_tokens=5 + i, temperature=1.0, ignore_eos=True)),
                     -1, rec.sink(f"c{i}"))
        run_until_idle(core)
        return rec.result("r0").token_ids

    alone = run(0)
    assert run(3) == alone and run(5) == alone
    assert run(0, seed=99) != alone


def test_tiny_top_p_is_greedy(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[4], SamplingParams(max_tokens=8, temperature=1.0,
                                                        top_p=1e-6, ignore_eos=True)),
             -1, rec.sink("r0"))
    run_until_idle(core)
    assert rec.result("r0").token_ids == solo_generate(model, tok, PROMPTS[4], 8)


def test_sample_next_penalties_and_top_p():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9], [0.0, 1.0, 5.0, 4.9]])
    p = SamplingParams(temperature=0.0)
    assert sample_next(logits, [p, p], [None, None], [[], []]) == [2, 2]
    pen = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert sample_next(logits, [pen, p], [None, None], [[2], [2]]) == [3, 2]
    pres = SamplingParams(temperature=0.0, presence_penalty=4.5)
    assert sample_next(logits, [pres, p], [None, None], [[2, 3], []]) == [1, 2]
    # top_p keeps only the tokens that make up the mass: 2 and 3 here
    tp = SamplingParams(temperature=1.0, top_p=0.9)
    g = make_generator(0)
    seen = {sample_next(logits[:1], [tp], [g], [[]])[0] for _ in range(200)}
    assert seen == {2, 3}


# ------------------------------------------------------------------------------ failures


def test_abort_frees_the_row(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[0], greedy(30)), -1, rec.sink("r0"))
    core.add(request(tok, 1, PROMPTS[1], greedy(10)), -1, rec.sink("r1"))
    core.step()
    core.abort("r0")
    core.step()
    assert core.running == 1
    run_until_idle(core)
    assert rec.result("r0") is None
    assert rec.result("r1").token_ids == solo_generate(model, tok, PROMPTS[1], 10)


def test_a_failing_forward_fails_only_the_requests_in_flight(base):
    _, model, tok = base
    adapter = ModelAdapter(model)
    real = adapter.forward
    state = {"fail": True}

    def flaky(*a, **kw):
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("boom")
        return real(*a, **kw)

    adapter.forward = flaky
    core = EngineCore(adapter, tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[0], greedy(4)), -1, rec.sink("r0"))
    core.add(request(tok, 1, PROMPTS[1], greedy(4)), -1, rec.sink("r1"))
    core.step()
    for rid in ("r0", "r1"):
        assert isinstance(rec.events[rid][-1], Failed)
    assert not core.has_work()
    core.add(request(tok, 2, PROMPTS[2], greedy(4)), -1, rec.sink("r2"))
    run_until_idle(core)
    assert rec.result("r2").token_ids == solo_generate(model, tok, PROMPTS[2], 4)


# ------------------------------------------------------------------------------ async


def test_async_engine_streams_and_cancels(base):
    _, model, tok = base

    async def main():
        eng = AsyncEngine(EngineCore(ModelAdapter(model), tok))
        s1 = eng.submit(request(tok, 0, PROMPTS[0], greedy(10)), -1)
        s2 = eng.submit(request(tok, 1, PROMPTS[1], greedy(200)), -1)
        deltas = []
        async for ev in s1:
            if isinstance(ev, TokenDelta):
                deltas.append(ev.text)
            elif isinstance(ev, Finished):
                deltas.append(ev.last_delta)
                res = ev.result
        assert "".join(deltas) == res.text
        s2.cancel()  # the client went away
        assert await eng.drain(timeout=10)
        assert eng.core.running == 0 and eng.in_flight == 0
        s3 = eng.submit(request(tok, 2, PROMPTS[2], greedy(5)), -1)
        r3 = await collect(s3)
        await eng.close()
        return res, r3

    res, r3 = asyncio.run(main())
    assert res.token_ids == solo_generate(model, tok, PROMPTS[0], 10)
    assert r3.token_ids == solo_generate(model, tok, PROMPTS[2], 5)


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_other_architectures(tmp_path, arch):
    """Not only Llama: GPT-2 (learned positions, its own attention) and Mistral with a
    sliding window shorter than the prompts, through the same path."""
    from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=1, eos_token_id=2)
    else:
        cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            sliding_window=6, max_position_embeddings=256, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    _, tok = make_base_model(tmp_path / arch, config=cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / arch)).eval()
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    for i, p in enumerate(PROMPTS[:4]):
        core.add(request(tok, i, p, greedy(8)), -1, rec.sink(f"r{i}"))
        core.step()
    run_until_idle(core)
    for i, p in enumerate(PROMPTS[:4]):
        assert rec.result(f"r{i}").token_ids == solo_generate(model, tok, p, 8), f"row {i}"


# ------------------------------------------------------------------------------ text


def test_tracker_never_splits_a_character(base):
    _, _, tok = base
    text = "naïve café — 東京 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tr = TextTracker(tok)
    deltas = [tr.add(t) for t in ids] + [tr.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_tracker_holds_back_a_possible_stop_and_releases_it(base):
    _, _, tok = base
    text = "alpha END beta"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tr = TextTracker(tok, stop=("ENDX",))
    out = "".join(tr.add(t) for t in ids) + tr.finish()
    assert out == text and not tr.stopped
    tr = TextTracker(tok, stop=("D b",))
    out = "".join(tr.add(t) for t in ids)
    assert tr.stopped and out == tr.text == "alpha EN"
    assert tr.finish() == ""


# ------------------------------------------------------------------------------ logprobs


@pytest.fixture(scope="module")
def flan(base):
    return attached(base, "flan", 5)


def direct_logprobs(mm, ids: list[int], **routing) -> torch.Tensor:
    """log-softmax of one forward of the MoDULA model over `ids` (1 row), float32."""
    with torch.inference_mode():
        out = mm(input_ids=torch.tensor([ids]), **routing)
    return torch.log_softmax(out.logits[0].float(), -1)


@pytest.mark.parametrize("variant", ["res", "flan"])
def test_logprobs_equal_a_direct_forward(modula, flan, variant):
    """Routed, pinned, fixed-weight and restricted rows share one batch; every prompt and
    generated token's log probability (and the top alternatives) equals a plain forward of
    the same model over prompt + generated tokens, with the same routing, within 1e-4."""
    from modula.serving.engine import RowRouting
    from modula.serving.modeling import modula_adapter
    from modula.serving.protocol import Routing

    mm, tok = modula if variant == "res" else flan
    adapter = modula_adapter(mm)
    cols = adapter.gate_names
    weights = {"math": 0.7, "units": 0.3} if variant == "res" else {"universal": 0.5,
                                                                    "code": 0.5}
    cases = [
        (PROMPTS[0], Routing(), {}),
        (PROMPTS[1], Routing(domain="code"), {"expert_ids": [0]}),
        (PROMPTS[3], Routing(weights=tuple(weights.items())),
         {"expert_weights": torch.tensor([[weights.get(c, 0.0) for c in cols]])}),
        (PROMPTS[4], Routing(allowed=("math", "units")),
         {"expert_mask": torch.tensor([[c in ("math", "units") for c in cols]])}),
        (PROMPTS[2], Routing(), {}),
    ]
    core = EngineCore(adapter, tok, max_running=8)
    rec = Recorder()
    for i, (p, routing, _) in enumerate(cases):
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3,
                                prompt_logprobs=3 if i % 2 == 0 else None)
        req = GenerationRequest(f"r{i}", tuple(tok(p)["input_ids"]), params, routing.domain,
                                routing=None if routing.domain else routing)
        core.add(req, adapter.row_routing(req.route()), rec.sink(f"r{i}"))
    run_until_idle(core)
    assert isinstance(adapter.row_routing(Routing(allowed=("math",))), RowRouting)
    for i, (p, routing, kw) in enumerate(cases):
        res = rec.result(f"r{i}")
        prompt = list(tok(p)["input_ids"])
        full = prompt + res.token_ids
        ref = direct_logprobs(mm, full, **kw)
        assert len(res.logprobs) == 5
        for j, (t, lp, top) in enumerate(res.logprobs):
            pos = len(prompt) - 1 + j
            assert t == full[pos + 1]
            assert lp == pytest.approx(float(ref[pos, t]), abs=1e-4), (i, j)
            vals, idx = ref[pos].topk(3)
            assert [a for a, _ in top] == idx.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
            assert t == top[0][0]  # greedy: the chosen token is the best one
        if i % 2 == 0:
            plp = res.prompt_logprobs
            assert plp[0] is None and len(plp) == len(prompt)
            for j in range(1, len(prompt)):
                t, lp, top = plp[j]
                assert t == prompt[j]
                assert lp == pytest.approx(float(ref[j - 1, t]), abs=1e-4), (i, j)
                assert [a for a, _ in top] == ref[j - 1].topk(3).indices.tolist()
        else:
            assert res.prompt_logprobs is None
        assert res.info["routing"]["mode"] == routing.mode
    w = rec.result("r2")
    assert w.gates == pytest.approx({c: weights.get(c, 0.0) for c in cols}, abs=1e-5)
    assert w.info["routing"]["weights"] == pytest.approx(weights)
    assert rec.result("r3").gates[cols[0]] == pytest.approx(0.0, abs=1e-6) or variant == "res"


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(base):
    _, model, tok = base
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    ids = tuple(tok(PROMPTS[3])["input_ids"])
    core.add(GenerationRequest("e", ids, SamplingParams(max_tokens=0, logprobs=2,
                                                        prompt_logprobs=2)), -1, rec.sink("e"))
    core.add(request(tok, 1, PROMPTS[0], greedy(3)), -1, rec.sink("r1"))
    run_until_idle(core)
    res = rec.result("e")
    assert res.token_ids == [] and res.completion_tokens == 0 and res.finish_reason == "length"
    assert res.logprobs == [] and len(res.prompt_logprobs) == len(ids)
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert [e[1] for e in res.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    assert rec.result("r1").token_ids == solo_generate(model, tok, PROMPTS[0], 3)


def test_min_tokens_stop_token_ids_and_logprobs_of_the_last_token(base):
    """A stop token id ends the row (its log probability is reported, its text is not);
    min_tokens bans eos and stop ids until enough tokens are out."""
    _, model, tok = base
    tokens = solo_generate(model, tok, PROMPTS[1], 8)
    stop_id = tokens[2]
    first = tokens.index(stop_id)
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[1], SamplingParams(
        max_tokens=8, temperature=0.0, stop_token_ids=(stop_id,), logprobs=0)), -1,
        rec.sink("a"))
    core.add(request(tok, 1, PROMPTS[1], SamplingParams(
        max_tokens=8, temperature=0.0, stop_token_ids=(stop_id,), min_tokens=first + 2)), -1,
        rec.sink("b"))
    run_until_idle(core)
    a = rec.result("a")
    assert a.finish_reason == "stop" and a.token_ids == tokens[:first]
    assert [e[0] for e in a.logprobs] == tokens[:first + 1]  # the stop token's is reported
    b = rec.result("b")
    assert len(b.token_ids) >= first + 2 and stop_id not in b.token_ids[:first + 2]


def test_sampling_extensions():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]] * 2)
    gens = [make_generator(0), make_generator(0)]
    # top_k 1 and min_p close to 1 both leave only the best token, whatever the temperature
    for kw in ({"top_k": 1}, {"min_p": 0.99}):
        p = SamplingParams(temperature=2.0, **kw)
        assert {sample_next(logits, [p, p], gens, [[], []])[0] for _ in range(20)} == {0}
    logits = logits[:1]
    # repetition penalty divides a positive logit of a seen token (prompt or generated)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, [p], [None], [[]], prompts=[[0]]) == [1]
    assert sample_next(logits, [p], [None], [[]], prompts=[[4]]) == [0]
    # banned tokens (before min_tokens) and logit bias
    g = SamplingParams(temperature=0.0)
    assert sample_next(logits, [g], [None], [[]], banned=[(0, 1)]) == [2]
    b = SamplingParams(temperature=0.0, logit_bias=((4, 10.0),))
    assert sample_next(logits, [b], [None], [[]]) == [4]


def test_many_stop_sequences(base):
    _, model, tok = base
    ref = tok.decode(solo_generate(model, tok, PROMPTS[1], 30), skip_special_tokens=True)
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    stops = tuple(f"never-{i}" for i in range(15)) + (stop,)
    core = EngineCore(ModelAdapter(model), tok)
    rec = Recorder()
    core.add(request(tok, 0, PROMPTS[1], greedy(30, stop=stops)), -1, rec.sink("r0"))
    run_until_idle(core)
    assert rec.result("r0").text == ref[:ref.index(stop)]


def test_row_routing_refusals(modula):
    from modula.serving.modeling import modula_adapter
    from modula.serving.protocol import Routing

    adapter = modula_adapter(modula[0])
    with pytest.raises(KeyError):
        adapter.row_routing(Routing(weights=(("finance", 1.0),)))
    with pytest.raises(ValueError, match="always on"):  # Res: the universal expert is not gated
        adapter.row_routing(Routing(allowed=("universal",)))
    base_only = ModelAdapter(modula[0].base_model)
    with pytest.raises(ValueError, match="no expert weights"):
        base_only.row_routing(Routing(weights=(("math", 1.0),)))


# ------------------------------------------------------------------------- request routing


@pytest.mark.parametrize("variant", ["res", "flan"])
def test_request_level_routing_follows_the_classifier(base, variant):
    """With router.granularity request, a routed request takes the classifier's weights for
    its whole generation (the same tokens as the model's own generate with those weights),
    and the response reports the class probabilities; pinned requests keep their pin."""
    from transformers import AutoModelForCausalLM

    from modula.config import ModulaLayerConfig, RouterConfig
    from modula.model import attach_modula
    from modula.serving.modeling import modula_adapter

    path, _, tok = base
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    mm = attach_modula(hf, ModulaLayerConfig(variant=variant, universal_rank=8, domain_rank=4,
                                             router=RouterConfig(granularity="request")),
                       ["code", "math", "units"])
    randomize_experts(mm, seed=5)
    mm.eval()
    labels = [1, 2, 0, 3, 1]  # classes: universal, code, math, units
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    feats = mm.request_features(enc["input_ids"], enc["attention_mask"])
    fit = mm.request_router.fit(feats, torch.tensor(labels), steps=200)
    assert fit["accuracy"] == 1.0
    adapter = modula_adapter(mm, version=1)
    assert adapter.classify is not None and adapter.info["granularity"] == "request"
    core = EngineCore(adapter, tok, max_running=8)
    rec = Recorder()
    for i, p in enumerate(PROMPTS):
        core.add(request(tok, i, p, greedy(5)), -1, rec.sink(f"r{i}"))
    core.add(request(tok, 9, PROMPTS[0], greedy(5), "math"), adapter.expert_id("math"),
             rec.sink("pinned"))
    run_until_idle(core)
    classes = ["universal", "code", "math", "units"]
    for i, p in enumerate(PROMPTS):
        res = rec.result(f"r{i}")
        probs = res.info["classifier"]
        assert list(probs) == classes and max(probs, key=probs.get) == classes[labels[i]]
        ids = tok(p, return_tensors="pt")["input_ids"]
        w = mm.request_weights(mm.request_probs(ids))
        with torch.inference_mode():
            ref = mm.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                              pad_token_id=0, expert_weights=w)
        assert res.token_ids == ref[0, ids.shape[1]:].tolist(), f"prompt {i} differs"
        if labels[i]:  # top-1 on a domain: that expert's gate is 1 on every token
            assert res.gates[classes[labels[i]]] == pytest.approx(1.0, abs=1e-5)
    pinned = rec.result("pinned")
    assert "classifier" not in pinned.info and pinned.gates["math"] == pytest.approx(1.0)
