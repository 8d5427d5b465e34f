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
- ``peft``: PEFT with one LoRA adapter per domain, a mixed-adapter batch (``adapter_names``).

Before the timed rounds, one step of each system runs under ``torch.profiler`` and its aten
calls are counted (every ``aten::`` event, nested ones included). The clock is this thread's
CPU time with one torch thread (``--clock cpu``, the default: a shared machine does not
inflate it) or wall time. Every system's logits are checked against its own prefilled path
where they must agree (``pinned`` = ``fixed`` with one-hot weights is not assumed; each system
just has to run). The adapter FLOP ratio of each size is printed beside the measured overhead.

    .venv/bin/python benchmarks/decode_step.py --sizes tiny,small,medium \
        --out benchmarks/results/decode_step.json
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
SYSTEMS = ("base", "routed", "pinned", "fixed", "mixed", "peft")


def modula_model(base: Any, seed: int = 0) -> Any:
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
        prepare()
    return model


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
                 kw: dict[str, Any]):
        from transformers import DynamicCache

        self.name, self.model, self.kw = name, model, kw
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
            out = self.model(input_ids=self.next, attention_mask=self.mask, position_ids=self.pos,
                             use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache},
                             **self.kw)
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
    res = modula_model(base) if set(systems) - {"base", "peft"} else None
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
    steppers = {}
    for name in systems:
        model, kw = plan[name]
        if name == "peft":
            model = peft_model(base)
        steppers[name] = Stepper(name, model, ids, mask, kw)
    calls = {name: aten_calls(s) for name, s in steppers.items()}
    for s in steppers.values():
        s.step()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for name, s in steppers.items():
            t = clock()
            s.step()
            samples[name].append(clock() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    params = sum(p.numel() for p in base.parameters())
    ratio = flop_ratio(base, len(DOMAINS), UNIVERSAL_RANK, DOMAIN_RANK)
    out = {"size": size, "params": params, "hidden": base.config.hidden_size,
           "layers": base.config.num_hidden_layers, "rows": rows, "rounds": rounds,
           "flop_ratio": ratio["all"], "flop_ratio_adapted": ratio["adapted"],
           "aten_calls": calls, "ms_per_step": ms, "wall_s": round(time.time() - t0, 1)}
    if "base" in ms:
        out["overhead"] = {k: v / ms["base"] - 1 for k, v in ms.items() if k != "base"}
    return out


def print_size(r: dict[str, Any]) -> None:
    print(f"\n{r['size']}: {r['params'] / 1e6:.1f} M parameters, hidden {r['hidden']}, "
          f"{r['layers']} layers, batch {r['rows']}, {r['rounds']} rounds; adapter FLOP ratio "
          f"{r['flop_ratio']:.3f} (over the adapted linears {r['flop_ratio_adapted']:.3f}), "
          f"limit 1.5x = {1.5 * r['flop_ratio']:.3f}")
    print(f"  {'system':8s} {'aten/step':>9s} {'ms/step':>9s} {'overhead':>9s} {'ok':>4s}")
    for name, ms in r["ms_per_step"].items():
        ovh = r.get("overhead", {}).get(name)
        ok = "" if ovh is None or name == "peft" else (
            "yes" if ovh <= 1.5 * r["flop_ratio"] else "no")
        cell = f"{ovh:+9.3f}" if ovh is not None else f"{'-':>9s}"
        print(f"  {name:8s} {r['aten_calls'][name]:9d} {ms:9.2f} {cell} {ok:>4s}")
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
