"""The built-in domain suite: disjoint, deterministic splits and answers a program can check."""

from __future__ import annotations

import re

import pytest

from modula.data.builtin import (
    _CONVERSIONS,
    _DOWN,
    _UNIT_FACTS,
    _UP,
    BUILTIN_BUILDERS,
    Example,
    builtin_splits,
    corpus_documents,
    split_examples,
)

SIZES = {"train": 300, "validation": 40, "test": 40}


@pytest.fixture(scope="module")
def suites():
    return {name: builtin_splits(name, SIZES, seed=0) for name in BUILTIN_BUILDERS}


def _norm(t: str) -> str:
    return " ".join(t.split()).lower()


@pytest.mark.parametrize("name", list(BUILTIN_BUILDERS))
def test_splits_are_disjoint_and_full(suites, name):
    sp = suites[name]
    assert {k: len(v) for k, v in sp.items()} == SIZES
    ids = {s: {e.uid for e in sp[s]} for s in sp}
    prompts = {s: {_norm(e.prompt) for e in sp[s]} for s in sp}
    groups = {s: {e.group for e in sp[s]} for s in sp}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b], (name, a, b)
        assert not prompts[a] & prompts[b], (name, a, b)
        assert not groups[a] & groups[b], (name, a, b)
    # free text (not short answers) never repeats across splits either
    long_train = {_norm(e.response) for e in sp["train"] if len(e.response) >= 40}
    for s in ("validation", "test"):
        assert not {_norm(e.response) for e in sp[s] if len(e.response) >= 40} & long_train


@pytest.mark.parametrize("name", list(BUILTIN_BUILDERS))
def test_splits_are_deterministic(suites, name):
    again = builtin_splits(name, SIZES, seed=0)
    assert again == suites[name]
    other = builtin_splits(name, SIZES, seed=1)
    assert [e.uid for e in other["test"]] != [e.uid for e in suites[name]["test"]]


def test_code_is_split_by_module_and_test_modules_are_unseen(suites):
    sp = suites["code"]
    test_modules = {e.group for e in sp["test"]}
    assert all(g.startswith("module:") for g in test_modules)
    # many modules, not one big one
    assert len(test_modules) >= 8
    train_modules = {e.group for e in sp["train"]}
    assert not test_modules & train_modules
    compiled = 0
    for e in sp["test"]:
        mod = e.group.removeprefix("module:")
        assert f"`{mod}`" in e.prompt
        head = e.prompt.split("\n\n", 1)[1]
        assert head.startswith(("def ", "async def ", "@"))
        try:  # head + body is the whole function again
            compile(head + "\n" + e.response + "\n", "<code>", "exec", dont_inherit=True)
            compiled += 1
        except SyntaxError:
            pass
    assert compiled >= 0.9 * len(sp["test"])


def test_general_is_prose_from_the_interpreter(suites):
    sp = suites["general"]
    kinds = {e.group.split(":")[0] for s in sp.values() for e in s}
    assert kinds == {"topic", "module"}
    for e in sp["train"][:50]:
        letters = sum(c.isalpha() or c.isspace() for c in e.response)
        assert letters / len(e.response) > 0.75
        assert len(e.response) <= 480


def test_math_answers_are_exact(suites):
    for e in [x for s in suites["math"].values() for x in s]:
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", e.response)
        assert steps
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
            if op == "/":
                assert a % b == 0
        assert e.response.endswith(f"The answer is {e.answer}.")
        assert steps[-1][3] == e.answer


def test_convert_answers_follow_the_conversion(suites):
    factors = {(a, b): f for a, b, f in _CONVERSIONS}
    assert all(str(f).rstrip("0") == "1" for f in factors.values())  # powers of ten
    for e in [x for s in suites["convert"].values() for x in s]:
        m = re.fullmatch(r"Convert (\d+) (\S+) to (\S+)\.", e.prompt)
        assert m, e.prompt
        v, src, dst = int(m.group(1)), m.group(2), m.group(3)
        val, unit = e.answer.split(" ", 1)
        assert unit == dst
        if (src, dst) in factors:
            assert int(val) == v * factors[(src, dst)]
        else:
            assert int(val) * factors[(dst, src)] == v


def test_units_answers_are_the_table_facts(suites):
    """Each prompt names one (larger, smaller) pair of the table, and the answer is its count;
    held-out prompts ask the table's facts in other words than the train prompts."""
    for split, rows in suites["units"].items():
        for e in rows:
            hits = [(b, s, n) for b, s, n in _UNIT_FACTS
                    if re.search(rf"\b{s}\b", e.prompt) and re.search(rf"\b(a|one|1) {b}\b", e.prompt, re.IGNORECASE)]
            assert len(hits) == 1, (split, e.prompt, hits)
            assert e.answer == e.response == str(hits[0][2])
    train = {_norm(e.prompt) for e in suites["units"]["train"]}
    assert not train & {_norm(e.prompt) for e in suites["units"]["test"]}
    asked = {e.answer for e in suites["units"]["test"]}
    assert len(asked) >= 10  # the test split spans the table, not one fact


def test_headline_labels_follow_the_event(suites):
    for e in [x for s in suites["headlines"].values() for x in s]:
        up = any(ev in e.prompt for ev in _UP)
        down = any(ev in e.prompt for ev in _DOWN)
        assert up != down
        assert e.answer == e.response == ("up" if up else "down")
    labels = [e.answer for e in suites["headlines"]["train"]]
    assert 0.35 < labels.count("up") / len(labels) < 0.65


def test_product_answers_are_in_the_description(suites):
    for e in [x for s in suites["products"].values() for x in s]:
        desc = e.prompt.split("\n")[0]
        assert e.answer in desc
        assert e.response == e.answer


def test_split_examples_keeps_groups_whole_and_drops_repeated_text():
    long = "a long shared response text that repeats across two groups here"
    ex = [Example(f"p{g}-{i}", f"r{g}-{i}", "", f"g{g}") for g in range(30) for i in range(3)]
    ex += [Example("dup-a", long, "", "g0"), Example("dup-b", long, "", "g7")]
    sp = split_examples(ex, {"train": 1000, "validation": 6, "test": 6}, seed=3)
    where = {}
    for s, items in sp.items():
        for e in items:
            where.setdefault(e.group, set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    with_long = [s for s, items in sp.items() for e in items if e.response == long]
    assert len(with_long) <= 1 or set(with_long) == {"train"}
    # one group gives at most ceil(6/20) = 1 example to a held-out split
    for s in ("validation", "test"):
        gs = [e.group for e in sp[s]]
        assert len(gs) == len(set(gs))


def test_corpus_leaves_out_held_out_groups(suites):
    held = {e.group for s in ("validation", "test") for e in suites["code"][s]}
    docs = corpus_documents("code", held, max_chars=300_000)
    assert docs and not {g for g, _ in docs} & held
    assert sum(len(t) for _, t in docs) <= 300_000
    prose = corpus_documents("general", held, max_chars=100_000)
    assert prose and not {g for g, _ in prose} & held
