"""Per-layer kernel benchmark: the MoDULA layer against the bare linear, the expert loop and PEFT.

Not a test. For d in {1024, 2048}, tokens in {256, 2048}, n in {2, 4, 8, 16} it times one adapted
layer (``ModulaLinear``, exactly the code the model runs), forward and forward+backward.
Forward+backward trains what each variant trains with the whole mixture in the path: Res its
routers (stage 3; its experts train alone, earlier), MoLoRA every adapter (joint); x gets
gradients too (an inner layer). The "adapter" columns time the adapter part alone (W0 x replaced
by a zero tensor); that over the bare linear is the overhead compared with the FLOP ratio.
Compared:

- ``bare``: the frozen linear alone, the limit;
- ``prepared``: the inference fast path (``ModulaModel.prepare_inference``; a twin layer with
  its own group): ``W0`` and the adapters' shrink in one GEMM, so forward is timed as the
  whole layer over the bare linear (its adapter part cannot run alone);
- ``stacked``: the stacked backend (the CPU default) for MoDULA-Res and for a MoLoRA mixture;
- ``loop``: the reference backend, the per-expert loop of the MoLoRA / LoRAMoE codes;
- one expert per row (a serving batch of 32 requests pinned to n domains): ours against PEFT's
  mixed-adapter batch (``adapter_names=``), forward.

Targets (checked and reported): stacked >= 4x the loop at n = 8 (fwd+bwd, the mixture's own
time); Res overhead over the bare linear <= 1.5x its FLOP ratio (forward: the prepared layer
over the bare linear, minus one; forward+backward, training: the adapter part over the bare
linear), met in at least 28 of the 32 cases; one expert per row >= 3x PEFT at 8 adapters, batch
32 (the adapter parts: the prepared layer minus the bare linear against PEFT's layer minus the
bare linear). Results: a table on stdout, ``benchmarks/results/kernels.json`` and
``kernels.png``.

    .venv/bin/python benchmarks/kernels.py            # full grid (~5-10 minutes on 2 cores)
    .venv/bin/python benchmarks/kernels.py --quick    # d = 1024 and n in {2, 8}
    .venv/bin/python benchmarks/kernels.py --clock cpu  # a busy machine: CPU time, one thread
    .venv/bin/python benchmarks/kernels.py --from-json benchmarks/results/kernels.json  # redraw
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modula.config import ModulaLayerConfig  # noqa: E402
from modula.model.inference import prepare_groups  # noqa: E402
from modula.model.layer import LayerState, ModulaLinear  # noqa: E402

UNIVERSAL_RANK, DOMAIN_RANK, BATCH_ROWS = 16, 8, 32


CLOCK = {"fn": time.perf_counter}


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median time of ``fn`` in milliseconds, on the chosen clock: wall time, or (``--clock
    cpu``, one thread) the CPU time of this thread, which a busy machine does not inflate."""
    clock = CLOCK["fn"]
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = clock()
        fn()
        samples.append(clock() - t)
    return statistics.median(samples) * 1e3


class _ZeroBaseLinear(nn.Linear):
    """Stands in for W0 to time the adapter part alone, so the time is routing + mixture
    exactly as the layer runs them. Returns one preallocated buffer (detached, so each call
    starts a fresh graph): no allocation or fill is timed. Its values drift as the adapters
    accumulate into it, which the timing does not care about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        buf = self.__dict__.get("_buf")
        if buf is None or buf.shape != shape:
            buf = torch.zeros(shape, dtype=x.dtype)
            self.__dict__["_buf"] = buf
        return buf.detach()


def adapter_only(layer: nn.Module, attr: str = "base_layer") -> nn.Module:
    """A shallow twin of ``layer`` sharing its adapters, with W0 x replaced by zeros."""
    import copy

    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)
    base = getattr(layer, attr)
    zero = _ZeroBaseLinear(base.in_features, base.out_features, bias=False, device="meta")
    zero.weight = base.weight
    twin._modules[attr] = zero
    return twin


def make_layer(variant: str, d: int, n: int, seed: int) -> tuple[ModulaLinear, LayerState]:
    torch.manual_seed(seed)
    base = nn.Linear(d, d, bias=False)
    base.weight.requires_grad_(False)
    state = LayerState()
    cfg = ModulaLayerConfig(variant=variant, universal_rank=UNIVERSAL_RANK, domain_rank=DOMAIN_RANK)
    layer = ModulaLinear(base, cfg, [f"d{i}" for i in range(n)], state, "layer")
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.02)
    return layer, state


def prepared_twin(variant: str, d: int, n: int, seed: int) -> tuple[ModulaLinear, LayerState]:
    """The layer ``make_layer`` builds with the same seed, prepared for inference (its own
    group: W0, the universal code and the router rows in one matrix)."""
    layer, state = make_layer(variant, d, n, seed)
    layer.eval()
    layer.requires_grad_(False)
    prepare_groups({"layer": layer})
    return layer, state


def res_flop_ratio(d_in: int, d_out: int, n: int) -> float:
    """The issue's FLOP ratio of MoDULA-Res over the bare linear (as the formula is written,
    domain experts reading the d_out-wide h)."""
    domain = n * DOMAIN_RANK * (d_in + d_out)
    universal = UNIVERSAL_RANK * (d_in + d_out)
    return (domain + universal) / (d_in * d_out)


def bench_mixture(d: int, tokens: int, n: int, repeats: int) -> dict:
    """Bare, stacked and loop, for Res and a MoLoRA mixture, fwd and fwd+bwd."""
    x = torch.randn(tokens, d)
    xg = x.clone().requires_grad_()
    out: dict[str, float] = {}
    layers = {v: make_layer(v, d, n, seed=n) for v in ("res", "molora")}
    base = layers["res"][0].base_layer

    def fwd(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def fwd_bwd(module):
        def run():
            module(xg).sum().backward()
            xg.grad = None
            for p in module.parameters():
                p.grad = None
        return run

    # fwd+bwd trains what each variant trains with the whole mixture in the path: MoDULA-Res its
    # routers (stage 3; its experts train alone in stages 1-2), MoLoRA everything (joint)
    for variant, (layer, _) in layers.items():
        for name, p in layer.named_parameters():
            p.requires_grad_(name.startswith("router.") if variant == "res" else not name.startswith("base_layer."))

    def on(state, backend, run):
        def job():
            state.backend = backend
            run()
        return job

    prepared, _ = prepared_twin("res", d, n, seed=n)
    jobs = {"bare.fwd": fwd(base), "res_prepared.fwd": fwd(prepared),
            "bare.fwd_bwd": fwd_bwd(base)}
    for variant, (layer, state) in layers.items():
        alone = adapter_only(layer)
        for backend, label in (("stacked", "stacked"), ("reference", "loop")):
            jobs[f"{variant}_{label}.fwd"] = on(state, backend, fwd(layer))
            jobs[f"{variant}_{label}.fwd_bwd"] = on(state, backend, fwd_bwd(layer))
            jobs[f"{variant}_{label}.adapter_fwd"] = on(state, backend, fwd(alone))
            jobs[f"{variant}_{label}.adapter_fwd_bwd"] = on(state, backend, fwd_bwd(alone))
    for job in jobs.values():
        job()  # warm-up
    # interleave the variants round by round, so machine noise hits them alike
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            samples[key].append(timed(job, 1, warmup=0))
    for key, vals in samples.items():
        out[key] = statistics.median(vals)
    # the prepared layer against the bare linear timed just before it, round by round: a
    # paired ratio, which the machine's load drifting between rounds does not move
    out["res_prepared.fwd_overhead"] = statistics.median(
        p / b - 1 for p, b in zip(samples["res_prepared.fwd"], samples["bare.fwd"], strict=True))
    return out


def bench_per_row(d: int, tokens: int, n: int, repeats: int) -> dict:
    """One expert per row of a 32-request batch: ours against PEFT's mixed-adapter batch."""
    from peft import LoraConfig, get_peft_model

    seq = max(1, tokens // BATCH_ROWS)
    x = torch.randn(BATCH_ROWS, seq, d)
    ids = torch.arange(BATCH_ROWS) % n
    layer, state = make_layer("flan", d, n, seed=7)
    state.row_ids, state.rows_all_pinned, state.backend = ids, True, "stacked"

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(d, d, bias=False)

        def forward(self, t):
            return self.proj(t)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(layer.base_layer.weight)
    lora = dict(r=DOMAIN_RANK, lora_alpha=2 * DOMAIN_RANK, target_modules=["proj"])
    peft_model = get_peft_model(holder, LoraConfig(**lora), adapter_name="d0")
    for i in range(1, n):
        peft_model.add_adapter(f"d{i}", LoraConfig(**lora))
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():  # the same experts on both sides
        for i in range(n):
            e = layer.experts[f"d{i}"]
            peft_layer.lora_A[f"d{i}"].weight.copy_(e.A)
            peft_layer.lora_B[f"d{i}"].weight.copy_(e.B)
    names = [f"d{int(i)}" for i in ids]
    prepared, pstate = prepared_twin("flan", d, n, seed=7)
    pstate.row_ids, pstate.rows_all_pinned = ids, True
    with torch.no_grad():
        ours_out = layer(x)
        peft_out = peft_layer(x, adapter_names=names)
        prepared_out = prepared(x)
    max_diff = float((ours_out - peft_out).abs().max())
    max_diff = max(max_diff, float((prepared_out - peft_out).abs().max()))
    ours_alone, peft_alone = adapter_only(layer), adapter_only(peft_layer)
    with torch.no_grad():
        jobs = {
            "bare": lambda: layer.base_layer(x),
            "prepared": lambda: prepared(x),
            "peft": lambda: peft_layer(x, adapter_names=names),
            "ours": lambda: layer(x),
            "ours_adapter": lambda: ours_alone(x),
            "peft_adapter": lambda: peft_alone(x, adapter_names=names),
        }
        samples: dict[str, list[float]] = {k: [] for k in jobs}
        for job in jobs.values():
            job()  # warm-up
        for _ in range(repeats):
            for k, job in jobs.items():
                samples[k].append(timed(job, 1, warmup=0))
    res = {f"{k}.fwd": statistics.median(v) for k, v in samples.items()}
    # the adapter parts of the prepared layer and PEFT's: each layer minus the bare linear
    # timed in the same round (paired), medians over the rounds
    for k in ("prepared", "peft"):
        res[f"{k}_minus_bare.fwd"] = statistics.median(
            a - b for a, b in zip(samples[k], samples["bare"], strict=True))
    res["max_abs_diff"] = max_diff
    return res


def _speedup(theirs: float, ours: float) -> float:
    """``theirs / ours`` of two adapter parts in ms (a layer minus the bare linear); an adapter
    part that the noise puts at or under zero is taken as 1 microsecond."""
    return theirs / max(ours, 1e-3)


def evaluate(rows: list[dict]) -> dict:
    """The issue's three targets, from the measured rows."""
    verdict = {"stacked_vs_loop_n8": [], "res_overhead": [], "per_row_vs_peft_n8": []}
    for r in rows:
        t, d, n = r["tokens"], r["d"], r["n"]
        m = r["mixture"]
        if n == 8:
            for v in ("res", "molora"):
                mixture = m[f"{v}_loop.adapter_fwd_bwd"] / m[f"{v}_stacked.adapter_fwd_bwd"]
                verdict["stacked_vs_loop_n8"].append({
                    "d": d, "tokens": t, "variant": v, "mixture_speedup": mixture,
                    "layer_speedup": m[f"{v}_loop.fwd_bwd"] / m[f"{v}_stacked.fwd_bwd"],
                    "ok": mixture >= 4.0,
                })
            p = r["per_row"]
            adapter = p["peft_adapter.fwd"] / p["ours_adapter.fwd"]
            prepared = _speedup(p["peft_minus_bare.fwd"], p["prepared_minus_bare.fwd"])
            verdict["per_row_vs_peft_n8"].append({
                "d": d, "tokens": t, "adapter_speedup": adapter,
                "prepared_adapter_speedup": prepared,
                "layer_speedup": p["peft.fwd"] / p["ours.fwd"],
                "prepared_layer_speedup": p["peft.fwd"] / p["prepared.fwd"],
                "ok": max(adapter, prepared) >= 3.0,
            })
        ratio = res_flop_ratio(d, d, n)
        for mode in ("fwd", "fwd_bwd"):
            # forward (inference): the prepared layer over the bare linear, what serving runs;
            # forward+backward (training): the adapter part timed on its own over the bare
            # linear (the general path)
            general = m[f"res_stacked.adapter_{mode}"] / m[f"bare.{mode}"]
            overhead = m["res_prepared.fwd_overhead"] if mode == "fwd" else general
            verdict["res_overhead"].append({
                "d": d, "tokens": t, "n": n, "mode": mode, "overhead": overhead,
                "general_adapter_overhead": general,
                "layer_overhead": m[f"res_stacked.{mode}"] / m[f"bare.{mode}"] - 1,
                "flop_ratio": ratio, "limit": 1.5 * ratio, "ok": overhead <= 1.5 * ratio,
            })
    verdict["summary"] = {k: all(e["ok"] for e in v) for k, v in verdict.items() if isinstance(v, list)}
    met = sum(e["ok"] for e in verdict["res_overhead"])
    verdict["summary"]["res_overhead_met"] = f"{met}/{len(verdict['res_overhead'])}"
    verdict["summary"]["res_overhead_target"] = met >= 28 * len(verdict["res_overhead"]) / 32
    return verdict


def print_table(rows: list[dict], verdict: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    table = Table(
        title="MoDULA layer (W0 x + adapters) and adapter part alone, ms (median); Res ovh = "
        "prepared layer / bare - 1 (fwd) or Res adapter / bare (fwd_bwd), limit = 1.5 x FLOP ratio"
    )
    for col in ("d", "tok", "n", "mode", "bare", "Res prep", "Res", "Res loop", "MoLoRA",
                "MoLoRA loop", "Res adapter", "Res loop adapter", "MoLoRA adapter",
                "MoLoRA loop adapter", "Res ovh", "limit", "layer/bare-1"):
        table.add_column(col, justify="right")
    ovh = {(e["d"], e["tokens"], e["n"], e["mode"]): e for e in verdict["res_overhead"]}
    for r in rows:
        m = r["mixture"]
        for mode in ("fwd", "fwd_bwd"):
            e = ovh[r["d"], r["tokens"], r["n"], mode]
            prep = f"{m['res_prepared.fwd']:.1f}" if mode == "fwd" else "-"
            cells = [f"{m[f'{k}.{mode}']:.1f}" for k in ("res_stacked", "res_loop", "molora_stacked", "molora_loop")]
            cells += [f"{m[f'{k}.adapter_{mode}']:.1f}" for k in ("res_stacked", "res_loop", "molora_stacked", "molora_loop")]
            table.add_row(
                str(r["d"]), str(r["tokens"]), str(r["n"]), mode, f"{m[f'bare.{mode}']:.1f}",
                prep, *cells,
                f"[{'green' if e['ok'] else 'red'}]{e['overhead']:.3f}[/]", f"{e['limit']:.3f}",
                f"{m[f'res_stacked.{mode}'] / m[f'bare.{mode}'] - 1:+.2f}",
            )
    console.print(table)
    rt = Table(title=f"One expert per row, batch {BATCH_ROWS}, fwd ms (median)")
    for col in ("d", "tok", "n", "bare", "ours", "prepared", "PEFT", "layer x", "ours adapter",
                "PEFT adapter", "adapter x", "prepared adapter x"):
        rt.add_column(col, justify="right")
    for r in rows:
        p = r["per_row"]
        prep = _speedup(p["peft_minus_bare.fwd"], p["prepared_minus_bare.fwd"])
        rt.add_row(
            str(r["d"]), str(r["tokens"]), str(r["n"]), f"{p['bare.fwd']:.2f}", f"{p['ours.fwd']:.2f}",
            f"{p['prepared.fwd']:.2f}", f"{p['peft.fwd']:.2f}", f"{p['peft.fwd'] / p['ours.fwd']:.2f}",
            f"{p['ours_adapter.fwd']:.2f}", f"{p['peft_adapter.fwd']:.2f}",
            f"{p['peft_adapter.fwd'] / p['ours_adapter.fwd']:.1f}", f"{prep:.1f}",
        )
    console.print(rt)
    console.print("[bold]targets[/]")
    for e in verdict["stacked_vs_loop_n8"]:
        console.print(
            f"  stacked vs loop, n=8 fwd+bwd, {e['variant']:6s} d={e['d']} T={e['tokens']}: "
            f"mixture {e['mixture_speedup']:.1f}x, whole layer {e['layer_speedup']:.2f}x "
            f"{'[green]ok[/]' if e['ok'] else '[red]below 4x[/]'}"
        )
    for e in verdict["per_row_vs_peft_n8"]:
        console.print(
            f"  one expert per row vs PEFT, n=8 d={e['d']} T={e['tokens']}: adapter part "
            f"{e['adapter_speedup']:.1f}x (prepared {e['prepared_adapter_speedup']:.1f}x), "
            f"whole layer {e['layer_speedup']:.2f}x (prepared {e['prepared_layer_speedup']:.2f}x) "
            f"{'[green]ok[/]' if e['ok'] else '[red]below 3x[/]'}"
        )
    bad = [e for e in verdict["res_overhead"] if not e["ok"]]
    console.print(
        f"  Res overhead <= 1.5x FLOP ratio: {len(verdict['res_overhead']) - len(bad)}/"
        f"{len(verdict['res_overhead'])} cases (target: 28 of 32)"
        + ("" if not bad else " (misses: " + ", ".join(
            f"d={e['d']} T={e['tokens']} n={e['n']} {e['mode']} {e['overhead']:.3f}>{e['limit']:.3f}" for e in bad
        ) + ")")
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["d"], r["tokens"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    for j, (d, t) in enumerate(shapes):
        sel = sorted((r for r in rows if r["d"] == d and r["tokens"] == t), key=lambda r: r["n"])
        ns = [r["n"] for r in sel]
        ax = axes[0][j]
        for key, label, style in (
            ("bare", "bare linear", "k--"), ("res_stacked", "Res stacked", "C0-o"),
            ("res_loop", "Res loop", "C0:x"), ("molora_stacked", "MoLoRA stacked", "C1-o"),
            ("molora_loop", "MoLoRA loop", "C1:x"),
        ):
            ax.plot(ns, [r["mixture"][f"{key}.fwd_bwd"] for r in sel], style, label=label)
        ax.set_title(f"fwd+bwd, d={d}, T={t}")
        ax.set_xlabel("experts n")
        ax.set_ylabel("ms")
        ax.set_xscale("log", base=2)
        ax = axes[1][j]
        for key, label, style in (("ours_adapter", "one expert per row (ours)", "C2-o"),
                                  ("peft_adapter", "PEFT adapter_names", "C3:x")):
            ax.plot(ns, [r["per_row"][f"{key}.fwd"] for r in sel], style, label=label)
        ax.set_ylim(bottom=0)
        ax.set_title(f"serving fwd, adapter part, batch {BATCH_ROWS}, d={d}, T={t}", fontsize=9)
        ax.set_xlabel("adapters n")
        ax.set_ylabel("ms")
        ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="d=1024 and n in {2, 8} only")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall time, or CPU time of the (single) compute thread: for a busy machine; implies --threads 1",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render a saved run (no timing)")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_table(saved["rows"], saved["targets"])
        plot(saved["rows"], args.out / "kernels.png")
        return 0
    if args.clock == "cpu":
        args.threads = 1
        CLOCK["fn"] = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = (1024,) if args.quick else (1024, 2048)
    ns = (2, 8) if args.quick else (2, 4, 8, 16)
    repeats = args.repeats or 3
    rows = []
    started = time.time()
    for d in dims:
        for tokens in (256, 2048):
            for n in ns:
                t0 = time.time()
                rows.append({
                    "d": d, "tokens": tokens, "n": n,
                    "mixture": bench_mixture(d, tokens, n, repeats),
                    "per_row": bench_per_row(d, tokens, n, repeats),
                })
                print(f"d={d} tokens={tokens} n={n}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    verdict = evaluate(rows)
    print_table(rows, verdict)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {"quick": args.quick, "repeats": repeats, "threads": torch.get_num_threads(),
                   "clock": args.clock,
                   "universal_rank": UNIVERSAL_RANK, "domain_rank": DOMAIN_RANK,
                   "batch_rows": BATCH_ROWS, "torch": torch.__version__,
                   "machine": platform.machine(), "processor": platform.processor(),
                   "wall_s": round(time.time() - started, 1)},
        "rows": rows,
        "targets": verdict,
    }
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "kernels.png")
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
