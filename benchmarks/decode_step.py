"""One decode step of a serving batch, in process (not a test): aten calls and time per step.

For each size (``benchmarks/sizes.py``) a batch of 32 prompts (20-60 tokens, left-padded) is
prefilled once per system, then every system decodes one token per row per step, round by
round (interleaved, so machine noise hits them alike); the median over the rounds is reported.
Systems:

- ``base``: the bare HF model (no MoDULA layers), the limit;
- ``routed``: MoDULA-Res, every row routed by the per-token routers;
- ``pinned``: MoDULA-Res, each row pinned to one domain (``expert_ids``);
- ``fixed``: MoDULA-Res, each row with fixed expert weights (``expert_weights``: what a
  request-level classifier gives), no router;
- ``mixed``: half the rows pinned, half routed (the serving benchmark's mix);
- ``peft``: PEFT with one LoRA adapter per domain, a mixed-adapter batch (``adapter_names``);
- ``<system>-compiled`` (``base``, ``routed``, ``pinned``, ``fixed``, ``mixed``): the same batch
  with the decode step through ``torch.compile`` (``serve.compile: decode``,
  ``ModulaModel.prepare_inference(compile="decode")``; the bare base compiled with the same
  options), a model of its own with the same weights. The first step compiles: its wall time
  is reported as ``compile_s``, apart from the timed steps; each is reported against its eager
  twin (``vs eager``), and its greedy tokens are checked against the twin's over the rounds.
  The overhead of a compiled MoDULA system is over the compiled base (same compiler).

Before the timed rounds, one step of each system runs under ``torch.profiler`` and its aten
calls are counted (every ``aten::`` event, nested ones included). The clock is this thread's
CPU time with one torch thread (``--clock cpu``, the default: a shared machine does not
inflate it) or wall time. Every system's logits are checked against its own prefilled path
where they must agree (``pinned`` = ``fixed`` with one-hot weights is not assumed; each system
just has to run). The adapter FLOP ratio of each size is printed beside the measured overhead.

    .venv/bin/python benchmarks/decode_step.py --sizes tiny,small,medium \
        --out benchmarks/results/decode_step.json

Compiling takes minutes per compiled system on a small machine; ``--systems`` without the
``-compiled`` names skips it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sizes import SIZES, flop_ratio, random_base  # noqa: E402

from modula.config import ModulaLayerConfig  # noqa: E402
from modula.model import attach_modula  # noqa: E402

DOMAINS = ["code", "math", "units", "headlines"]
UNIVERSAL_RANK, DOMAIN_RANK = 16, 8
EAGER = ("base", "routed", "pinned", "fixed", "mixed", "peft")
COMPILED = tuple(f"{s}-compiled" for s in ("base", "routed", "pinned", "fixed", "mixed"))
SYSTEMS = EAGER + COMPILED


def modula_model(base: Any, seed: int = 0, compile: str = "none") -> Any:
    model = attach_modula(copy.deepcopy(base), ModulaLayerConfig(
        variant="res", universal_rank=UNIVERSAL_RANK, domain_rank=DOMAIN_RANK), DOMAINS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "universal" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    prepare = getattr(model, "prepare_inference", None)
    if prepare is not None:
        # (no argument unless compiling: the same script measures commits before the switch)
        prepare(compile=compile) if compile != "none" else prepare()
    return model


def compiled_base(base: Any) -> Any:
    """The bare base model's forward through torch.compile with the options of the compiled
    MoDULA decode step (modula/model/compiled.py)."""
    return torch.compile(base, dynamic=True, fullgraph=True)


def peft_model(base: Any, seed: int = 1) -> Any:
    from peft import LoraConfig, get_peft_model

    from modula.model import default_targets

    plain = copy.deepcopy(base)
    lc = LoraConfig(r=DOMAIN_RANK, lora_alpha=2 * DOMAIN_RANK,
                    target_modules=default_targets(plain), lora_dropout=0.0)
    model = get_peft_model(plain, lc, adapter_name=DOMAINS[0])
    for d in DOMAINS[1:]:
        model.add_adapter(d, lc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def batch(rows: int, seed: int = 0, vocab: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 61, (rows,), generator=g)
    width = int(lengths.max())
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


class Stepper:
    """One system's running batch: prefilled once, then one token per row per ``step``."""

    def __init__(self, name: str, model: Any, ids: torch.Tensor, mask: torch.Tensor,
                 kw: dict[str, Any], step_model: Any = None):
        from transformers import DynamicCache

        self.name, self.model, self.kw = name, model, kw
        # what runs the decode steps (the compiled base: the prefill stays eager, as for
        # MoDULA's compiled decode step)
        self.step_model = step_model if step_model is not None else model
        self.cache = DynamicCache()
        params = inspect.signature(_hf(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.mask = mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                        use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache}, **kw)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.pos = mask.sum(1, keepdim=True)

    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        with torch.inference_mode():
            out = self.step_model(input_ids=self.next, attention_mask=self.mask,
                                  position_ids=self.pos, use_cache=True, logits_to_keep=1,
                                  **{self.cache_kw: self.cache}, **self.kw)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.pos = self.pos + 1


def _hf(model: Any) -> Any:
    """The HF model under a MoDULA or PEFT wrapper."""
    while hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
    return model


def aten_calls(stepper: Stepper) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stepper.step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def run_size(size: str, systems: list[str], rounds: int, rows: int, clock) -> dict[str, Any]:
    t0 = time.time()
    base = random_base(size)
    ids, mask = batch(rows, vocab=base.config.vocab_size)
    eager_res = {"routed", "pinned", "fixed", "mixed"}
    res = modula_model(base) if eager_res & set(systems) else None
    compiled_res = {f"{s}-compiled" for s in eager_res}
    res_c = modula_model(base, compile="decode") if compiled_res & set(systems) else None
    g = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(rows, len(DOMAINS), generator=g), -1)
    pins = torch.arange(rows) % len(DOMAINS)
    half = torch.where(torch.arange(rows) % 2 == 1, pins, torch.full_like(pins, -1))
    plan = {
        "base": (base, {}),
        "routed": (res, {}),
        "pinned": (res, {"expert_ids": pins}),
        "fixed": (res, {"expert_weights": weights}),
        "mixed": (res, {"expert_ids": half}),
        "peft": (None, {"adapter_names": [DOMAINS[int(i)] for i in pins]}),
    }
    for name in ("routed", "pinned", "fixed", "mixed"):
        plan[f"{name}-compiled"] = (res_c, plan[name][1])
    steppers = {}
    for name in systems:
        if name == "base-compiled":
            # a copy: compiling must not touch the eager base's module
            b = copy.deepcopy(base)
            steppers[name] = Stepper(name, b, ids, mask, {}, step_model=compiled_base(b))
            continue
        model, kw = plan[name]
        if name == "peft":
            model = peft_model(base)
        steppers[name] = Stepper(name, model, ids, mask, kw)
    compile_s = {}
    for name, s in steppers.items():
        if name.endswith("-compiled"):  # the first step compiles: timed apart, on the wall
            t = time.perf_counter()
            s.step()
            compile_s[name] = time.perf_counter() - t
    calls = {name: aten_calls(s) for name, s in steppers.items()}
    for s in steppers.values():
        s.step()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in steppers}
    twins = {n: n[:-len("-compiled")] for n in steppers
             if n.endswith("-compiled") and n[:-len("-compiled")] in steppers}
    agree = {n: 0 for n in twins}
    for _ in range(rounds):
        for name, s in steppers.items():
            t = clock()
            s.step()
            samples[name].append(clock() - t)
        for n, twin in twins.items():  # same weights, same prefill: the same greedy tokens
            agree[n] += int(torch.equal(steppers[n].next, steppers[twin].next))
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    params = sum(p.numel() for p in base.parameters())
    ratio = flop_ratio(base, len(DOMAINS), UNIVERSAL_RANK, DOMAIN_RANK)
    out = {"size": size, "params": params, "hidden": base.config.hidden_size,
           "layers": base.config.num_hidden_layers, "rows": rows, "rounds": rounds,
           "flop_ratio": ratio["all"], "flop_ratio_adapted": ratio["adapted"],
           "aten_calls": calls, "ms_per_step": ms, "wall_s": round(time.time() - t0, 1)}
    if "base" in ms:
        # a compiled system against the compiled base when there is one (same compiler)
        out["overhead"] = {
            k: v / ms["base-compiled" if k.endswith("-compiled") and "base-compiled" in ms
                      else "base"] - 1
            for k, v in ms.items() if k not in ("base", "base-compiled")}
    if compile_s:
        out["compile_s"] = compile_s
        out["compiled_vs_eager"] = {n: ms[n] / ms[twin] for n, twin in twins.items()}
        out["tokens_agree"] = {n: agree[n] / rounds for n in twins}
        step = getattr(res_c, "compiled_decode", None)
        # the compiled MoDULA step ran compiled, or gave up (and ran eager) for this reason
        out["compile_failure"] = None if step is None else step.failure
    return out


def print_size(r: dict[str, Any]) -> None:
    print(f"\n{r['size']}: {r['params'] / 1e6:.1f} M parameters, hidden {r['hidden']}, "
          f"{r['layers']} layers, batch {r['rows']}, {r['rounds']} rounds; adapter FLOP ratio "
          f"{r['flop_ratio']:.3f} (over the adapted linears {r['flop_ratio_adapted']:.3f}), "
          f"limit 1.5x = {1.5 * r['flop_ratio']:.3f}")
    compiled = r.get("compiled_vs_eager", {})
    print(f"  {'system':15s} {'aten/step':>9s} {'ms/step':>9s} {'overhead':>9s} {'ok':>4s}"
          + (f" {'vs eager':>8s} {'compile s':>9s} {'tokens':>6s}" if "compile_s" in r else ""))
    for name, ms in r["ms_per_step"].items():
        ovh = r.get("overhead", {}).get(name)
        ok = "" if ovh is None or name in ("peft", "base-compiled") else (
            "yes" if ovh <= 1.5 * r["flop_ratio"] else "no")
        cell = f"{ovh:+9.3f}" if ovh is not None else f"{'-':>9s}"
        extra = ""
        if name in r.get("compile_s", {}):
            ratio = compiled.get(name)
            agree = r["tokens_agree"].get(name)
            extra = (f" {ratio:8.3f}" if ratio is not None else f" {'-':>8s}") + \
                f" {r['compile_s'][name]:9.1f}" + \
                (f" {agree:6.0%}" if agree is not None else f" {'-':>6s}")
        print(f"  {name:15s} {r['aten_calls'][name]:9d} {ms:9.2f} {cell} {ok:>4s}{extra}")
    if r.get("compile_failure"):
        print(f"  the compiled MoDULA step fell back to eager: {r['compile_failure']}")
    if "peft" in r["ms_per_step"]:
        for name in ("routed", "pinned", "fixed", "mixed"):
            if name in r["ms_per_step"]:
                print(f"  {name} vs peft: {r['ms_per_step']['peft'] / r['ms_per_step'][name]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=20, help="timed decode steps per system")
    ap.add_argument("--rows", type=int, default=32, help="batch rows (concurrency)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (cpu clock: 1)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    threads = 1 if args.clock == "cpu" else args.threads
    torch.set_num_threads(threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown} (allowed: {', '.join(SYSTEMS)})")
    results = []
    load_start = os.getloadavg()
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r} (allowed: {', '.join(SIZES)})")
        r = run_size(size, systems, args.rounds, args.rows, clock)
        print_size(r)
        results.append(r)
    load_end = os.getloadavg()
    print(f"\nload average: {load_start[0]:.1f} at start, {load_end[0]:.1f} at end")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "config": {"clock": args.clock, "threads": threads, "rows": args.rows,
                       "rounds": args.rounds, "torch": torch.__version__,
                       "machine": platform.machine(), "load_start": load_start[0],
                       "load_end": load_end[0]},
            "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
