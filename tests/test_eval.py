"""Metrics on hand-checked cases, evaluation of a real (tiny) HF model, the gate collector
against the ModulaModel gate API, and the comparison table / Markdown / PNGs."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from modula.config import DomainConfig, ModulaConfig, StorageConfig
from modula.data.tokenizer import train_tokenizer
from modula.eval.evaluate import (
    DomainResult,
    GateShares,
    VariantResult,
    choose_labels,
    collect_gate_shares,
    evaluate_domain,
    evaluate_model,
    expert_names,
    generate_responses,
    response_nll,
)
from modula.eval.metrics import (
    accuracy,
    exact_match,
    exact_match_rate,
    extract_answer,
    geometric_mean,
    normalize_answer,
    perplexity,
)
from modula.eval.report import (
    block_shares,
    comparison,
    load_gate_shares,
    load_results,
    plot_gate_heatmaps,
    render_table,
    save_gate_shares,
    save_result,
    to_markdown,
    write_report,
)
from modula.infra.storage import Storage

# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("pred, ref, hit", [
    ("8 * 2 = 16. The answer is 16.", "16", True),
    ("The answer is 16", "16", True),
    ("7 + 9 = 16. The answer is 17.", "16", False),
    ("The answer is 3, no wait. The answer is 16.", "16", True),  # the last statement counts
    ("3000 m", "3000 m", True),
    ("3000 M.", "3000 m", True),
    ("3,000 m", "3000 m", True),
    ("3000 m\nand more text", "3000 m", True),  # first line
    ("300 m", "3000 m", False),
    ("  $69.00 ", "$69.00", True),
    ("$69.0", "$69.00", False),
    ("'Lumen'", "Lumen", True),
    ("", "16", False),
])
def test_exact_match_cases(pred, ref, hit):
    assert exact_match(pred, ref) is hit


def test_extract_and_normalize():
    assert extract_answer("2 * 10 = 20. 18 + 20 = 38. 38 - 16 = 22. The answer is 22.") == "22."
    assert extract_answer("The answer is 5. Then more words.") == "5"
    assert extract_answer("the answer is: $69.00.") == "$69.00."
    assert normalize_answer("22.") == "22"
    assert extract_answer("\n\n  up  \n") == "up"
    assert normalize_answer("  Forest   GREEN ") == "forest green"
    assert normalize_answer("1,234,567") == "1234567"


def test_rates_accuracy_perplexity():
    assert exact_match_rate(["The answer is 4.", "5"], ["4", "6"]) == 0.5
    assert accuracy(["up", "Down", "up", "down"], ["up", "down", "down", "down"]) == 0.75
    with pytest.raises(ValueError):
        accuracy(["up"], ["up", "down"])
    assert math.isnan(accuracy([], []))
    assert perplexity(4 * math.log(10), 4) == pytest.approx(10.0)
    assert perplexity(0.0, 0) == math.inf
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)


# ------------------------------------------------------------------------------ a tiny real model

TEXTS = ["What is 2 + 3? The answer is 5.", "Convert 2 km to m. 2000 m", "Headline: X wins. up",
         "Headline: Y loses. down", "def f(x):\n    return x + 1\n"] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltok")
    return train_tokenizer(TEXTS, 300, d)


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id))
    return m.eval()


def test_response_nll_matches_a_manual_computation(model, tok):
    from modula.data.tokenizer import render_prompt, render_response

    recs = [{"prompt": "What is 2 + 3?", "response": "The answer is 5."},
            {"prompt": "Convert 2 km to m.", "response": "2000 m"}]
    nll, n = response_nll(model, tok, recs, 64, batch_size=2)
    total, count = 0.0, 0
    for r in recs:  # one at a time, no padding, log-softmax by hand
        p = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        q = tok(render_response(tok, r["response"]), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + q])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for i in range(len(p), len(p) + len(q)):
            total -= float(logp[i - 1, ids[0, i]])
            count += 1
    assert n == count
    assert nll == pytest.approx(total, rel=1e-4)


def test_generation_is_greedy_and_batch_independent(model, tok):
    prompts = ["What is 2 + 3?", "Headline: X wins.", "Convert 2 km to m."]
    batched = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_responses(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(x, str) for x in batched)


def test_choose_labels_picks_the_likeliest(model, tok):
    prompts = ["Headline: X wins.", "Headline: Y loses."]
    picked = choose_labels(model, tok, prompts, ["up", "down"], 64)
    from modula.data.encode import encode_example
    from modula.eval.evaluate import _token_nll

    for p, got in zip(prompts, picked, strict=True):
        scores = {}
        for lab in ("up", "down"):
            from modula.data.encode import collate

            with torch.no_grad():
                nll, _ = _token_nll(model, collate([encode_example(tok, p, lab, 64)], tok.pad_token_id))
            scores[lab] = float(nll[0])
        assert got == min(scores, key=scores.get)


def _cfg(tmp_path) -> ModulaConfig:
    return ModulaConfig(storage=StorageConfig(root=str(tmp_path)), domains=[
        DomainConfig(name="general", metric="perplexity"),
        DomainConfig(name="math", metric="exact_match"),
        DomainConfig(name="headlines", metric="accuracy"),
    ])


RECORDS = {
    "general": [{"prompt": "Say hi.", "response": "hi there", "answer": ""}] * 3,
    "math": [{"prompt": "What is 2 + 3?", "response": "The answer is 5.", "answer": "5"}] * 2,
    "headlines": [{"prompt": "Headline: X wins.", "response": "up", "answer": "up"},
                  {"prompt": "Headline: Y loses.", "response": "down", "answer": "down"}],
}


def test_evaluate_model_on_any_hf_model(model, tok, tmp_path):
    cfg = _cfg(tmp_path)
    seen = []
    res = evaluate_model(model, tok, cfg, RECORDS, "base", on_domain=seen.append)
    assert [d.domain for d in seen] == ["general", "math", "headlines"]
    assert res.general_perplexity == res.domains["general"].perplexity > 1
    assert res.domains["general"].score is None
    assert 0 <= res.domains["math"].score <= 100 and res.domains["math"].samples
    assert res.domains["headlines"].score in (0.0, 50.0, 100.0)
    assert res.domain_average == pytest.approx(
        (res.domains["math"].score + res.domains["headlines"].score) / 2)
    # round trip through JSON
    again = VariantResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again.domains["math"].score == res.domains["math"].score


def test_exact_match_scoring_uses_generation(tok, tmp_path):
    class Scripted(torch.nn.Module):
        """Generates a fixed answer: checks evaluate_domain scores what generate returns."""

        def __init__(self, text):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.reply = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

        def forward(self, input_ids, attention_mask=None, **kw):
            return (torch.zeros(*input_ids.shape, len(tok)),)

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            tail = torch.tensor(self.reply[:max_new_tokens]).expand(input_ids.shape[0], -1)
            return torch.cat([input_ids, tail], 1)

    recs = [{"prompt": "What is 2 + 3?", "response": "The answer is 5.", "answer": "5"},
            {"prompt": "What is 2 + 4?", "response": "The answer is 6.", "answer": "6"}]
    d = DomainConfig(name="math", metric="exact_match")
    r = evaluate_domain(Scripted("2 + 3 = 5. The answer is 5."), tok, d, recs, 64)
    assert r.score == 50.0
    assert r.samples[0]["prediction"] == "2 + 3 = 5. The answer is 5."
    # uniform logits: perplexity is exactly the vocabulary size
    assert r.perplexity == pytest.approx(len(tok), rel=1e-5)


# ------------------------------------------------------------------------------ router gates


class FakeModula(torch.nn.Module):
    """The ModulaModel gate API: capture_gates() / gate_weights() / domains. Gates are chosen so
    the expected shares can be written down: token id parity picks the expert."""

    domains = ["math", "units"]

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self._capturing = False
        self._gates = {}

    @contextlib.contextmanager
    def capture_gates(self):
        self._capturing, self._gates = True, {}
        try:
            yield
        finally:
            self._capturing = False

    def gate_weights(self):
        return dict(self._gates)

    def forward(self, input_ids, attention_mask=None, **kw):
        if self._capturing:
            odd = (input_ids % 2).float()
            g0 = torch.stack([odd, 1 - odd], -1)  # odd ids -> expert 0
            self._gates = {"model.layers.0.self_attn.q_proj": g0,
                           "model.layers.0.mlp.down_proj": g0.flip(-1),
                           "model.layers.1.self_attn.q_proj": torch.full_like(g0, 0.5)}
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_gate_shares_average_over_real_tokens(model, tok):
    from modula.data.encode import encode_example

    fake = FakeModula(model)
    recs = {"math": [{"prompt": "What is 2 + 3?", "response": "The answer is 5."},
                     {"prompt": "hi", "response": "ok"}],
            "units": [{"prompt": "Convert 2 km to m.", "response": "2000 m"}]}
    g = collect_gate_shares(fake, tok, recs, 64, batch_size=2)
    assert g.layers == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                        "model.layers.1.self_attn.q_proj"]
    assert g.experts == ["math", "units"] and g.domains == ["math", "units"]
    for di, d in enumerate(g.domains):
        ids = [t for r in recs[d] for t in encode_example(tok, r["prompt"], r["response"], 64)["input_ids"]]
        odd_share = sum(t % 2 for t in ids) / len(ids)  # padding excluded
        assert g.shares[0, di].tolist() == pytest.approx([odd_share, 1 - odd_share])
        assert g.shares[1, di].tolist() == pytest.approx([1 - odd_share, odd_share])
        assert g.shares[2, di].tolist() == pytest.approx([0.5, 0.5])
    b = block_shares(g)
    assert b.layers == ["layer 0", "layer 1"]
    assert b.shares[0].sum(-1).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(TypeError):
        collect_gate_shares(model, tok, recs, 64)


def test_expert_names():
    class M:
        domains = ["math", "units"]

    assert expert_names(M(), 2) == ["math", "units"]
    assert expert_names(M(), 3) == ["universal", "math", "units"]
    assert expert_names(object(), 2) == ["expert 0", "expert 1"]


# ------------------------------------------------------------------------------ the report


def _result(variant, math_score, head_score, ppl):
    doms = {"general": DomainResult("general", "perplexity", 10, ppl * 2),
            "code": DomainResult("code", "perplexity", 10, ppl),
            "math": DomainResult("math", "exact_match", 10, 3.0, math_score),
            "headlines": DomainResult("headlines", "accuracy", 10, 1.5, head_score)}
    return VariantResult(variant, "test", doms, ppl * 2, (math_score + head_score) / 2, ppl, 1.0)


def test_comparison_table_json_markdown_and_pngs(tmp_path):
    st = Storage(StorageConfig(root=str(tmp_path / "store")))
    for v, a, b, p in (("res", 40.0, 90.0, 4.0), ("base", 0.0, 50.0, 9.0), ("molora", 30.0, 80.0, 5.0)):
        save_result(st, _result(v, a, b, p))
    shares = np.random.default_rng(0).dirichlet(np.ones(3), size=(4, 2))
    save_gate_shares(st, "res", GateShares([f"model.layers.{i}.mlp.up_proj" for i in range(4)],
                                           ["math", "headlines"], ["code", "math", "headlines"], shares))
    results = load_results(st)
    assert list(results) == ["base", "molora", "res"]  # the paper's order
    table = comparison(results)
    assert [c["domain"] for c in table["columns"]] == ["code", "math", "headlines"]
    assert table["rows"][2]["domains"] == {"code": 4.0, "math": 40.0, "headlines": 90.0}
    assert table["rows"][2]["domain_average"] == 65.0
    md = to_markdown(results)
    assert "| MoDULA-Res | 4.00 | 40.0 | 90.0 | 65.0 | 4.00 | 8.00 |" in md
    assert "| base model | 9.00 | 0.0 | 50.0 | 25.0 | 9.00 | 18.00 |" in md
    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(render_table(results))
    text = con.export_text()
    assert "MoDULA-Res" in text and "65.0" in text
    files = write_report(st, tmp_path / "out")
    assert json.loads(files["json"].read_text())["rows"][0]["variant"] == "base"
    for k in ("bars", "gates-res"):
        assert files[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert st.exists("reports/comparison.md") and st.exists("reports/gates-res.png")
    assert load_gate_shares(st)["res"].shares.shape == (4, 2, 3)


def test_heatmap_checks_its_shape(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        plot_gate_heatmaps(np.zeros((2, 2, 2)), ["a"], ["x", "y"], ["e0", "e1"], tmp_path / "h.png")
    p = plot_gate_heatmaps(np.full((1, 2, 2), 0.5), ["layer 0"], ["x", "y"], ["e0", "e1"], tmp_path / "h.png")
    assert p.stat().st_size > 1000


def test_report_without_results_says_what_to_run(tmp_path):
    st = Storage(StorageConfig(root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="modula eval"):
        write_report(st, tmp_path / "out")


# ---- routing the evaluation: per-token routers, the request classifier, the pinned oracle ------


@pytest.fixture(scope="module")
def modula_model(model, tok):
    """The tiny model as MoDULA-Res over math and headlines, with a classifier that tells
    the domains' prompts apart (fitted on their own features: a fixed, known router)."""
    import copy

    from modula.config import ModulaLayerConfig
    from modula.model import attach_modula

    m = attach_modula(copy.deepcopy(model), ModulaLayerConfig(variant="res", universal_rank=4,
                                                              domain_rank=2),
                      ["math", "headlines"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".B") or name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    prompts = {0: [r["prompt"] for r in RECORDS["general"]][:1] + ["Say hello.", "Greet me."],
               1: ["What is 2 + 3?", "What is 4 + 4?", "What is 9 - 1?"],
               2: ["Headline: X wins.", "Headline: Y loses.", "Headline: Z grows."]}
    from modula.data.encode import collate
    from modula.data.tokenizer import render_prompt

    feats, labels = [], []
    for c, ps in prompts.items():
        enc = [{"input_ids": tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]}
               for p in ps]
        b = collate(enc, tok.pad_token_id)
        feats.append(m.request_features(b["input_ids"], b["attention_mask"]))
        labels += [c] * len(ps)
    m.request_router.fit(torch.cat(feats), torch.tensor(labels), steps=300)
    return m.eval()


def test_request_routing_equals_pinning_where_the_classifier_is_right(modula_model, tok, tmp_path):
    from modula.eval.evaluate import evaluate_model, routing_for

    cfg = _cfg(tmp_path)
    cfg.eval.max_new_tokens = 4  # three evaluations: keep the generation short
    records = {d: RECORDS[d] for d in ("general", "math", "headlines")}
    request = routing_for(modula_model, tok, "request", 64, top_k=1)
    pinned = routing_for(modula_model, tok, "pinned", 64)
    assert routing_for(modula_model, tok, "token", 64) is None
    # the classifier is right on these prompts, so request routing is the oracle
    w = request("math")(["What is 2 + 3?", "Headline: X wins.", "Say hi."])["expert_weights"]
    assert torch.equal(w, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    a = evaluate_model(modula_model, tok, cfg, records, "res", routing=request)
    b = evaluate_model(modula_model, tok, cfg, records, "res", routing=pinned)
    c = evaluate_model(modula_model, tok, cfg, records, "res")  # per-token routers
    for d in records:
        assert a.domains[d].perplexity == pytest.approx(b.domains[d].perplexity, rel=1e-6)
        assert a.domains[d].score == b.domains[d].score
    assert any(abs(c.domains[d].perplexity - b.domains[d].perplexity) > 1e-3 for d in records)
    # the oracle pins general to the universal expert alone
    with torch.no_grad():
        from modula.eval.evaluate import response_nll

        modula_model.force_domain("universal")
        want = response_nll(modula_model, tok, RECORDS["general"], 64)
        modula_model.force_domain(None)
    got = response_nll(modula_model, tok, RECORDS["general"], 64, route=pinned("general"))
    assert got[0] == pytest.approx(want[0], rel=1e-6) and got[1] == want[1]
    with pytest.raises(ValueError, match="unknown routing"):
        routing_for(modula_model, tok, "sideways", 64)


def test_gate_shares_follow_the_request_routing(modula_model, tok):
    from modula.eval.evaluate import routing_for

    recs = {"math": RECORDS["math"], "headlines": RECORDS["headlines"]}
    g = collect_gate_shares(modula_model, tok, recs, 64, batch_size=2,
                            routing=routing_for(modula_model, tok, "request", 64, top_k=1))
    np.testing.assert_allclose(g.shares[:, 0], [[1.0, 0.0]] * len(g.layers), atol=1e-6)
    np.testing.assert_allclose(g.shares[:, 1], [[0.0, 1.0]] * len(g.layers), atol=1e-6)
