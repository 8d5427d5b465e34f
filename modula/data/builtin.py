"""The built-in domain suite: seven domains built on this machine, deterministically, with no download.

- ``general``: English prose about Python from the interpreter's own documentation
  (``pydoc_data.topics``) and standard-library docstrings (read with ``ast``, nothing imported);
- ``code``: real standard-library Python functions; prompt = signature (+ docstring), response =
  the body; split **by module**, so no test module is seen in training;
- ``math``: arithmetic word problems with worked steps and an exact answer;
- ``units``: how many of one unit make another (a table of 40 facts: feet in a mile, hours in
  a day, ...), asked in many phrasings; closed-book recall of domain knowledge, the answer a
  number;
- ``convert``: unit conversions by powers of ten (5100 cm to m, ...), which need copying and
  arithmetic; the ``units`` of builder version 2, for models that can do that;
- ``headlines``: a market headline → ``up`` / ``down`` label;
- ``products``: one field (price, brand, colour, weight) extracted from a product description.

Every domain goes through :func:`split_examples`: examples are grouped (a module, a documentation
topic, a generated problem), whole groups are dealt to test, validation and train, and any example
whose prompt or response text also occurs in an earlier split is dropped. So the splits are disjoint
by group *and* by text, and the same seed gives byte-identical splits.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = [
    "Example",
    "SPLITS",
    "BUILTIN_BUILDERS",
    "BUILDER_VERSION",
    "builtin_splits",
    "split_examples",
    "stdlib_modules",
    "python_tag",
    "corpus_documents",
    "CORPUS_MAX_CHARS",
]

SPLITS = ("train", "validation", "test")
# bump when a generator changes: it is part of every data fingerprint
BUILDER_VERSION = "3"  # 2: units in powers of ten; 3: units is the unit-fact table, those conversions are convert

# response length caps (characters) keep prompt + response within a few hundred tokens
_GENERAL_MAX_RESPONSE = 480
_CODE_MAX_PROMPT = 420
_CODE_MAX_RESPONSE = 620


@dataclass(frozen=True)
class Example:
    """One prompt/response record. ``group`` is the unit of splitting; ``answer`` is what a
    program checks (empty for perplexity-only domains)."""

    prompt: str
    response: str
    answer: str
    group: str

    @property
    def uid(self) -> str:
        h = hashlib.sha256(f"{self.group}\x00{self.prompt}\x00{self.response}".encode())
        return h.hexdigest()[:16]


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _text_key(ex: Example, min_chars: int) -> str:
    r = _norm(ex.response)
    return r if len(r) >= min_chars else ""


def split_examples(
    examples: Iterable[Example], sizes: dict[str, int], seed: int | str, min_text_chars: int = 40
) -> dict[str, list[Example]]:
    """Deal whole groups to test, validation, then train; never the same text in two splits.

    1. exact duplicates (same prompt and response) are dropped, the first one kept;
    2. group names are sorted, then shuffled by ``seed``; groups are dealt in that order to
       ``test`` until it holds ``sizes['test']`` examples, then to ``validation``; a held-out split
       takes at most a twentieth of its size from one group (so it spans many groups) and the
       rest of such a group is dropped, never given to another split;
    3. an example whose prompt, or whose free-text response (at least ``min_text_chars`` long:
       short answers such as "up" legitimately repeat), already occurs (whitespace- and
       case-normalised) in an earlier held-out split is skipped; so is such a training example;
    4. every group left after that is training data, sampled down to ``sizes['train']``.

    So splits share no group and no text, and the same seed gives the same splits.
    """
    rng = random.Random(f"split:{seed}")
    by_group: dict[str, list[Example]] = {}
    seen: set[tuple[str, str]] = set()
    for ex in examples:
        k = (ex.prompt, ex.response)
        if k in seen:
            continue
        seen.add(k)
        by_group.setdefault(ex.group, []).append(ex)
    remaining = sorted(by_group)
    rng.shuffle(remaining)
    held_prompts: set[str] = set()
    held_texts: set[str] = set()

    def clash(ex: Example) -> bool:
        t = _text_key(ex, min_text_chars)
        return _norm(ex.prompt) in held_prompts or (bool(t) and t in held_texts)

    out: dict[str, list[Example]] = {}
    for name in ("test", "validation"):
        size, chosen = sizes.get(name, 0), []
        cap = max(1, -(-size // 20))
        while remaining and len(chosen) < size:
            members = sorted(by_group[remaining.pop(0)], key=lambda e: e.uid)
            rng.shuffle(members)
            take = [m for m in members if not clash(m)][: min(cap, size - len(chosen))]
            chosen += take
        for ex in chosen:
            held_prompts.add(_norm(ex.prompt))
            held_texts.add(_text_key(ex, min_text_chars))
        held_texts.discard("")
        out[name] = chosen
    train = sorted((ex for g in remaining for ex in by_group[g] if not clash(ex)),
                   key=lambda e: e.uid)
    rng.shuffle(train)
    out["train"] = train[: sizes.get("train", 0)]
    return {name: out[name] for name in SPLITS}


# --------------------------------------------------------------------------------------------
# the standard library, read as text


_SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
    "ensurepip", "__pycache__", "pydoc_data", "encodings", "__phello__",
}


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def stdlib_modules() -> tuple[tuple[str, str], ...]:
    """(dotted module name, source) of every pure-Python standard-library module, sorted."""
    root = _stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0].startswith(("config-", "test", "plat-")) or set(rel.parts[:-1]) & _SKIP_DIRS:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(not x.isidentifier() for x in parts):
            continue
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((".".join(parts), src))
    return tuple(out)


def _defs(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of the functions and classes of a module, nested ones included."""
    out: list[tuple[str, ast.AST]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{prefix}{child.name}"
                out.append((q, child))
                if isinstance(child, ast.ClassDef):
                    visit(child, q + ".")

    visit(tree, "")
    return out


@dataclass(frozen=True)
class _Def:
    module: str
    qual: str
    kind: str  # "function" or "class"
    doc: str | None
    head: str  # decorators, signature and docstring, dedented (functions only)
    body: str  # the statements after the docstring, dedented like `head` (functions only)


def _split_function(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str]:
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    end = node.end_lineno or node.lineno
    has_doc = ast.get_docstring(node) is not None
    if has_doc and len(node.body) == 1:
        return "", ""  # a docstring and nothing else
    cut = (node.body[1] if has_doc else node.body[0]).lineno - 1
    # comments right above the first statement belong to the body
    while cut > start and lines[cut - 1].strip().startswith("#"):
        cut -= 1
    indent = node.col_offset
    head = textwrap.dedent("\n".join(x[indent:] for x in lines[start:cut])).rstrip()
    body = "\n".join(x[indent:] if x[:indent].strip() == "" else x for x in lines[cut:end])
    return head, body.rstrip()


@cache
def _stdlib_defs() -> tuple[_Def, ...]:
    """Every function and class of the standard library, parsed once per process."""
    out: list[_Def] = []
    for module, src in stdlib_modules():
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines()
        for qual, node in _defs(tree):
            doc = ast.get_docstring(node)  # type: ignore[arg-type]
            if isinstance(node, ast.ClassDef):
                out.append(_Def(module, qual, "class", doc, "", ""))
            else:
                head, body = _split_function(node, lines)  # type: ignore[arg-type]
                out.append(_Def(module, qual, "function", doc, head, body))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# general: documentation prose


def _prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs of reST-ish text, rewrapped to one line; headings and code dropped."""
    paras: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or lines[0].startswith((" ", "\t")):
            continue  # an indented block: code, grammar or a literal
        if len(lines) >= 2 and re.fullmatch(r"[*=\-~^\"]{3,}", lines[-1].strip()):
            continue  # a heading
        para = " ".join(line.strip() for line in lines).strip()
        if len(para) < 40 or "::=" in para or para.startswith((">>>", "...", "[", "*", "+")):
            continue
        letters = sum(c.isalpha() or c == " " for c in para)
        if letters / len(para) < 0.8:
            continue
        paras.append(para)
    return paras


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, cut after the last full sentence that fits."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    m = max(head.rfind(". "), head.rfind(".\n"), head.rfind("? "), head.rfind(": "))
    return head[: m + 1].rstrip() if m > limit // 3 else head.rsplit(" ", 1)[0].rstrip()


def _first_sentence(para: str) -> tuple[str, str]:
    m = re.search(r"(?<=[a-z0-9)\"'])\. +(?=[A-Z\"'(])", para)
    if not m or m.end() > 240:
        return "", para
    return para[: m.start() + 1], para[m.end():]


@cache
def _general_examples() -> tuple[Example, ...]:
    import pydoc_data.topics

    out: list[Example] = []
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key]
        title = text.split("\n", 1)[0].strip().strip("*").strip() or key
        for para in _prose_paragraphs(text):
            first, rest = _first_sentence(para)
            if not first or len(rest) < 60:
                continue
            out.append(Example(
                prompt=f"Continue this passage from the Python documentation on {title}:\n\n{first}",
                response=_cut(rest, _GENERAL_MAX_RESPONSE),
                answer="",
                group=f"topic:{key}",
            ))
    for d in _stdlib_defs():
        if d.module.split(".")[-1].startswith("_") or any(
            part.startswith("_") for part in d.qual.split(".")
        ):
            continue
        paras = _prose_paragraphs(d.doc or "")
        if not paras:
            continue
        body = _cut("\n\n".join(paras), _GENERAL_MAX_RESPONSE)
        if len(body) < 60:
            continue
        out.append(Example(
            prompt=f"What does the {d.kind} `{d.qual}` in the Python module `{d.module}` do?",
            response=body,
            answer="",
            group=f"module:{d.module}",
        ))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# code: standard-library functions


@cache
def _code_examples() -> tuple[Example, ...]:
    out: list[Example] = []
    for d in _stdlib_defs():
        if d.kind != "function" or not d.head or len(d.body.strip()) < 40:
            continue
        if len(d.head) > _CODE_MAX_PROMPT or len(d.body) > _CODE_MAX_RESPONSE:
            continue
        out.append(Example(
            prompt=(f"Complete this function from the Python standard library module "
                    f"`{d.module}`:\n\n{d.head}"),
            response=d.body,
            answer="",
            group=f"module:{d.module}",
        ))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# generated task domains


_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira",
          "Liam", "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar",
          "Vera", "Wes", "Yuki", "Zoe"]
_ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "cards", "coins",
          "shells", "stamps", "eggs", "balloons", "buttons", "plums", "tickets"]


def _gen_math(rng: random.Random) -> Example:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        ans = a + b
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        steps = f"{a} + {b} = {ans}."
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        ans = a - b
        q = f"{name} has {a} {item} and gives {b} to {other}. How many {item} does {name} have left?"
        steps = f"{a} - {b} = {ans}."
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        ans = a * b
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps = f"{a} * {b} = {ans}."
    elif kind == 3:
        b, ans = rng.randint(2, 9), rng.randint(2, 12)
        a = b * ans
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        steps = f"{a} / {b} = {ans}."
    else:
        a, b, c = rng.randint(2, 30), rng.randint(2, 5), rng.randint(2, 10)
        bc = b * c
        d = rng.randint(1, a + bc - 1)
        ans = a + bc - d
        q = (f"{name} has {a} {item}, buys {b} packs of {c} {item}, then gives {d} {item} to "
             f"{other}. How many {item} does {name} have now?")
        steps = f"{b} * {c} = {bc}. {a} + {bc} = {a + bc}. {a + bc} - {d} = {ans}."
    return Example(q, f"{steps} The answer is {ans}.", str(ans), group=f"math:{q}")


# (larger unit, smaller unit, how many of the smaller make one larger): the ``units`` domain's
# table. Its answers come from nowhere in the prompt: a rank-8 expert on the built-in base learns
# such a lookup (headlines: 54 of 60 exact), while copying a number from the prompt, which
# ``convert`` needs, it does not learn (docs/method.md, "Budgets").
_UNIT_FACTS = [
    ("kilometre", "metres", 1000), ("metre", "centimetres", 100), ("centimetre", "millimetres", 10),
    ("metre", "millimetres", 1000), ("mile", "feet", 5280), ("mile", "yards", 1760),
    ("yard", "feet", 3), ("foot", "inches", 12), ("yard", "inches", 36),
    ("nautical mile", "metres", 1852), ("kilogram", "grams", 1000), ("gram", "milligrams", 1000),
    ("tonne", "kilograms", 1000), ("pound", "ounces", 16), ("stone", "pounds", 14),
    ("litre", "millilitres", 1000), ("kilolitre", "litres", 1000), ("gallon", "quarts", 4),
    ("quart", "pints", 2), ("tablespoon", "teaspoons", 3), ("cup", "tablespoons", 16),
    ("minute", "seconds", 60), ("hour", "minutes", 60), ("hour", "seconds", 3600),
    ("day", "hours", 24), ("week", "days", 7), ("fortnight", "days", 14), ("year", "months", 12),
    ("leap year", "days", 366), ("decade", "years", 10), ("century", "years", 100),
    ("millennium", "years", 1000), ("byte", "bits", 8), ("kibibyte", "bytes", 1024),
    ("kilobyte", "bytes", 1000), ("full turn", "degrees", 360), ("right angle", "degrees", 90),
    ("degree", "arcminutes", 60), ("hectare", "square metres", 10000), ("acre", "square feet", 43560),
]
_FACT_FORMS = [
    "How many {small} are in a {big}?", "How many {small} make one {big}?",
    "One {big} equals how many {small}?", "A {big} is how many {small}?",
    "Number of {small} in one {big}?", "How many {small} does a {big} have?",
    "Unit check: 1 {big} = ? {small}", "In {small}, how much is one {big}?",
]
_ASKED_FORMS = [
    "{name} asks: how many {small} are in a {big}?", "{name} wants to know how many {small} make a {big}.",
    "{name} is revising units. How many {small} are there in one {big}?",
    "Help {name}: one {big} is how many {small}?",
]


def _gen_units(rng: random.Random) -> Example:
    big, small, n = rng.choice(_UNIT_FACTS)
    if rng.random() < 0.25:
        q = rng.choice(_FACT_FORMS).format(big=big, small=small)
    else:
        q = rng.choice(_ASKED_FORMS).format(name=rng.choice(_NAMES), big=big, small=small)
    return Example(q, str(n), str(n), group=f"units:{q}")


# (from unit, to unit, factor): value_to = value_from * factor. Powers of ten only: converting
# is moving digits (append or drop zeros). The built-in base model learns that from a few
# thousand examples when all of its weights train, but not through rank-8 adapters (docs/method.md,
# "Budgets"). Multiplying by 60 or 16 it learned neither way, so hours/seconds, pounds/ounces and
# the like are out (docs/method.md, "Built-in domain suite").
_CONVERSIONS = [
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("m", "mm", 1000), ("kg", "g", 1000),
    ("g", "mg", 1000), ("tonnes", "kg", 1000), ("L", "mL", 1000), ("kL", "L", 1000),
    ("decades", "years", 10), ("centuries", "years", 100),
]


def _gen_convert(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(_CONVERSIONS)
    if rng.random() < 0.6:
        v = rng.randint(1, 250)
        q, ans = f"Convert {v} {src} to {dst}.", f"{v * factor} {dst}"
    else:
        k = rng.randint(1, 250)
        q, ans = f"Convert {k * factor} {dst} to {src}.", f"{k} {src}"
    return Example(q, ans, ans, group=f"convert:{q}")


_SYLLABLES = ["ac", "bel", "cor", "dyn", "el", "fal", "gen", "hal", "ix", "jo", "kor", "lum",
              "mar", "nov", "or", "pax", "quan", "ral", "sol", "tek", "ul", "ver", "wex", "zen"]
_SUFFIXES = ["Corp", "Inc", "Group", "Systems", "Holdings", "Labs", "Energy", "Motors",
             "Foods", "Networks", "Pharma", "Bank"]
_UP = ["beats earnings expectations", "raises full-year guidance", "wins a major government contract",
       "reports record quarterly revenue", "announces a share buyback", "gets regulatory approval for its new drug",
       "posts surprise profit", "signs a long-term supply deal", "lifts its dividend",
       "sees strong holiday sales", "upgraded to buy by analysts", "expands into new markets",
       "cuts debt ahead of schedule", "launches a best-selling product"]
_DOWN = ["misses revenue estimates", "cuts its profit forecast", "recalls thousands of vehicles",
         "faces a fraud investigation", "suspends its dividend", "loses a key patent case",
         "reports a surprise quarterly loss", "warns of weak demand", "downgraded to sell by analysts",
         "hit by a major data breach", "announces large layoffs", "delays its flagship product",
         "fined by regulators", "loses its biggest customer"]


def _company(rng: random.Random) -> str:
    stem = "".join(rng.sample(_SYLLABLES, rng.choice([2, 2, 3]))).capitalize()
    return f"{stem} {rng.choice(_SUFFIXES)}"


def _gen_headline(rng: random.Random) -> Example:
    up = rng.random() < 0.5
    event = rng.choice(_UP if up else _DOWN)
    co = _company(rng)
    form = rng.randrange(3)
    if form == 0:
        h = f"{co} {event}"
    elif form == 1:
        h = f"Breaking: {co} {event}"
    else:
        h = f"{co} {event}, report says"
    label = "up" if up else "down"
    q = f"Headline: {h}\nWill the company's stock go up or down?"
    return Example(q, label, label, group=f"headline:{h}")


_BRANDS = ["Trailcraft", "Nimbus", "Orbit", "Kestrel", "Lumen", "Arbor", "Vantage", "Pico",
           "Helix", "Tundra", "Marlow", "Zephyr", "Quill", "Sable", "Ember", "Juniper"]
_PRODUCTS = ["backpack", "kettle", "desk lamp", "headphones", "water bottle", "rain jacket",
             "blender", "office chair", "tent", "keyboard", "umbrella", "coffee grinder",
             "bike helmet", "toaster", "sleeping bag", "speaker"]
_ADJ = ["Classic", "Pro", "Lite", "Max", "Ultra", "Mini", "Eco", "Trek", "Air", "Prime"]
_COLOURS = ["black", "white", "forest green", "navy blue", "red", "grey", "sand", "orange",
            "teal", "purple", "silver", "yellow"]


def _gen_product(rng: random.Random) -> Example:
    brand, product, adj, colour = (rng.choice(_BRANDS), rng.choice(_PRODUCTS), rng.choice(_ADJ),
                                   rng.choice(_COLOURS))
    price = f"${rng.randint(5, 299)}.{rng.choice(['99', '49', '00', '95'])}"
    weight = f"{rng.randint(1, 9)}.{rng.randint(0, 9)} kg"
    model = f"{adj} {rng.randint(2, 9)}"
    facts = {
        "brand": f"is made by {brand}",
        "price": f"costs {price}",
        "colour": f"comes in {colour}",
        "weight": f"weighs {weight}",
    }
    order = list(facts)
    rng.shuffle(order)
    parts = [facts[k] for k in order]
    desc = (f"The {model} {product} {parts[0]}, {parts[1]} and {parts[2]}. "
            f"It also {parts[3]}.")
    field = rng.choice(order)
    question = {
        "brand": "Which brand makes it?",
        "price": "What is the price?",
        "colour": "What colour is it?",
        "weight": "How much does it weigh?",
    }[field]
    answer = {"brand": brand, "price": price, "colour": colour, "weight": weight}[field]
    q = f"Product: {desc}\n{question}"
    return Example(q, answer, answer, group=f"product:{q}")


def _generated(gen: Callable[[random.Random], Example], name: str) -> Callable[[int, int], list[Example]]:
    def build(n: int, seed: int) -> list[Example]:
        rng = random.Random(f"{name}:{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n and attempts < 50 * n:
            attempts += 1
            ex = gen(rng)
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out

    return build


def _real(fn: Callable[[], tuple[Example, ...]]) -> Callable[[int, int], list[Example]]:
    def build(n: int, seed: int) -> list[Example]:  # the pool is fixed; the seed deals it
        return list(fn())

    return build


# name -> builder(total examples wanted, seed) -> candidate pool
BUILTIN_BUILDERS: dict[str, Callable[[int, int], list[Example]]] = {
    "general": _real(_general_examples),
    "code": _real(_code_examples),
    "math": _generated(_gen_math, "math"),
    "units": _generated(_gen_units, "units"),
    "convert": _generated(_gen_convert, "convert"),
    "headlines": _generated(_gen_headline, "headlines"),
    "products": _generated(_gen_product, "products"),
}


def builtin_splits(name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[Example]]:
    """The train/validation/test examples of built-in domain `name` (deterministic in `seed`)."""
    if name not in BUILTIN_BUILDERS:
        raise KeyError(f"no built-in domain {name!r} (allowed: {', '.join(BUILTIN_BUILDERS)})")
    # generated domains: draw a margin over the sizes so dropped duplicates do not leave a split short
    total = int(sum(sizes.values()) * 1.25) + 50
    pool = BUILTIN_BUILDERS[name](total, seed)
    return split_examples(pool, sizes, f"{name}:{seed}")


# at most ~2M characters per corpus (about 0.55M tokens): with the training records, about one
# pass of a default pretraining run
CORPUS_MAX_CHARS = 2_000_000


def corpus_documents(name: str, exclude_groups: set[str], seed: int = 0,
                     max_chars: int = CORPUS_MAX_CHARS) -> list[tuple[str, str]]:
    """(group, text) documents for pretraining the built-in model on ``general`` or ``code``.

    ``general``: the prose of every documentation topic and the docstrings of every module;
    ``code``: whole module sources. Groups in `exclude_groups` (those of any validation or test
    example, of either domain) are left out, so held-out text is never pretrained on.
    """
    docs: list[tuple[str, str]] = []
    if name == "general":
        import pydoc_data.topics

        for key in sorted(pydoc_data.topics.topics):
            text = "\n\n".join(_prose_paragraphs(pydoc_data.topics.topics[key]))
            if text:
                docs.append((f"topic:{key}", text))
        by_module: dict[str, list[str]] = {}
        for d in _stdlib_defs():
            paras = _prose_paragraphs(d.doc or "")
            if paras:
                by_module.setdefault(d.module, []).append(f"{d.qual}: " + "\n\n".join(paras))
        docs += [(f"module:{m}", "\n\n".join(v)) for m, v in sorted(by_module.items())]
    elif name == "code":
        docs = [(f"module:{m}", src) for m, src in stdlib_modules() if src.strip()]
    else:
        raise KeyError(f"only general and code have a pretraining corpus, not {name!r}")
    docs = [d for d in docs if d[0] not in exclude_groups]
    rng = random.Random(f"corpus:{name}:{seed}")
    rng.shuffle(docs)
    out, total = [], 0
    for group, text in docs:
        if total >= max_chars:
            break
        text = text[: max_chars - total]
        out.append((group, text))
        total += len(text)
    return out


def python_tag() -> str:
    """The interpreter whose standard library the real-text domains are read from."""
    v = sys.version_info
    return f"{sys.implementation.name}-{v.major}.{v.minor}.{v.micro}"
