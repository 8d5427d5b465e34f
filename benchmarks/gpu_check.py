"""The device check: the Triton kernels, the serving engine and one training step on one GPU.

Not a test: it needs a CUDA GPU (``--dry-run`` runs the same code on the CPU at toy sizes, with
the Triton kernels interpreted, which is what the test suite does). Ray-free: it imports only
``modula.kernels``, ``modula.model``, ``modula.serving.engine`` and ``modula.trainers.common``,
which need torch, triton, transformers, peft, safetensors and pydantic (and PyYAML, which
``modula.config`` reads files with). It measures, each next to its target:

1. **accuracy**: Triton against the ``reference`` backend (fp32, on the same rounded inputs),
   relative error ``||triton - ref|| / ||ref||`` in bf16 and fp16, at d = 4096, n = 8 experts,
   256 tokens: MoDULA-Res and a MoLoRA-style mixture (LoRA experts reading x), each routed
   (per-token gates) and with one expert per row (requests pinned to domains); the ``stacked``
   torch path in the same dtype beside it. Targets: <= 1e-2 (bf16), <= 1e-3 (fp16).
2. **speed** (bf16, inference, d = 4096, n in {4, 8, 16}, 32 and 256 rows of one token, and a
   2,048-token prefill): the Res mixture's adapter part (delta) by Triton, stacked torch and the
   per-expert loop, with the frozen GEMM ``W0 x`` for scale (target: Triton >= 4x the loop at
   n = 8); and a whole layer with one adapter per row (requests pinned to domains): Triton,
   stacked, the loop and PEFT's mixed-adapter batch (``adapter_names=``).
3. **engine**: decode tokens/s of the continuous-batching engine at batch 64 (64 requests, 128
   new tokens each) on a random-weight Llama of about 1.1B parameters (TinyLlama's shape) in
   bf16: the bare base model, MoDULA-Res on Triton (8 domains; requests pinned round-robin,
   then routed), and PEFT with one adapter per request (8 adapters, HF ``generate`` with
   ``adapter_names``, prefill subtracted). Targets: Res >= 85 % of the bare base, >= 3x PEFT.
4. **training**: one bf16 step (the trainers' ``accumulated_step``: autocast over float32
   expert masters) of the router stage on 4 packed rows of 4,096 tokens, with and without
   gradient checkpointing: tokens/s and peak GPU memory.

Timing: CUDA events after warm-up iterations (the Triton autotune / compile falls in the
warm-up, and the whole run is budgeted: ``--budget-s``, default 420, skips what would not fit
and says so). It prints one table last (80 columns) and writes ``gpu_check.json`` and
``gpu_check.txt`` to ``$OUT`` (or ``--out``) when set.

    python benchmarks/gpu_check.py                 # on a GPU machine: < 8 minutes on one H100
    python benchmarks/gpu_check.py --dry-run       # CPU, toy sizes, TRITON_INTERPRET=1

On a machine without pydantic (the device image has torch, triton, transformers, peft,
safetensors and PyYAML), carry its wheels: ``pip download --no-deps --only-binary=:all:
-d .whl pydantic pydantic-core annotated-types typing-inspection`` (for the device's Python) and
install them with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=/tmp/site`` before running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDS = ("torch", "triton", "transformers", "peft", "safetensors", "pydantic", "yaml")
WIDTH = 80


# ------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    d: int
    experts: tuple[int, ...]
    rows: tuple[int, ...]  # decode-shaped: rows of one token
    prefill: tuple[int, int]  # (rows, tokens per row)
    model: dict[str, int]
    requests: int
    prompt: tuple[int, int]
    new_tokens: int
    train_rows: tuple[int, int]  # (rows, tokens per row)
    warmup: int
    iters: int
    repeats: int


GPU = Sizes(d=4096, experts=(4, 8, 16), rows=(32, 256), prefill=(8, 256),
            model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=4096),
            requests=64, prompt=(64, 128), new_tokens=128, train_rows=(4, 4096),
            warmup=3, iters=20, repeats=3)
DRY = Sizes(d=32, experts=(8,), rows=(4,), prefill=(2, 4),
            model=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256),
            requests=2, prompt=(4, 6), new_tokens=4, train_rows=(2, 32), warmup=1, iters=1,
            repeats=1)
DOMAIN_RANK, UNIVERSAL_RANK, DOMAINS = 8, 16, 8


# ------------------------------------------------------------------------------------ results


@dataclass
class Row:
    section: str
    case: str
    result: str
    target: str = ""
    met: bool | None = None  # None: no target, or not assessed (dry run)


@dataclass
class Check:
    dry: bool
    sizes: Sizes
    device: Any
    deadline: float
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, case: str, result: str, target: str = "",
            met: bool | None = None) -> None:
        self.rows.append(Row(section, case, result, target, None if self.dry else met))
        print(f"  {section:8s} {case:15s} {result}  {target}", flush=True)

    def skip(self, section: str, case: str, why: str) -> None:
        self.rows.append(Row(section, case, f"skipped: {why}"))
        print(f"  {section:8s} {case:15s} skipped: {why}", flush=True)


def missing_packages() -> list[str]:
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def timer(check: Check) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds per call of ``fn``: warm-up calls (compilation, autotune), then the median
    of ``repeats`` CUDA-event (GPU) or clock (CPU) measurements of ``iters`` calls each."""
    import torch

    cuda = check.device.type == "cuda"
    s = check.sizes

    def measure(fn: Callable[[], Any]) -> float:
        for _ in range(s.warmup):
            fn()
        samples = []
        for _ in range(s.repeats):
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(s.iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / s.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(s.iters):
                    fn()
                samples.append((time.perf_counter() - t0) * 1e3 / s.iters)
        return statistics.median(samples)

    return measure


def sync(check: Check) -> None:
    import torch

    if check.device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ 1 accuracy


def experts(d: int, n: int, dtype: Any, device: Any, res: bool, seed: int = 0):
    """n rank-8 experts (Res: reading h, d wide) and, for Res, the rank-16 universal expert;
    weights at a trained adapter's scale."""
    import torch

    from modula.kernels import Residual, stack_experts

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float) -> Any:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    A = [rnd(DOMAIN_RANK, d, scale=d ** -0.5) for _ in range(n)]
    B = [rnd(d, DOMAIN_RANK, scale=0.02) for _ in range(n)]
    residual = Residual(rnd(UNIVERSAL_RANK, d, scale=d ** -0.5),
                        rnd(d, UNIVERSAL_RANK, scale=0.02), 2.0) if res else None
    return stack_experts(A, B, 2.0), residual


def inputs(tokens: int, d: int, n: int, dtype: Any, device: Any, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)
    gates = torch.softmax(torch.randn(tokens, n, generator=g), -1).to(device=device, dtype=dtype)
    ids = (torch.arange(tokens) % n).to(device)
    return x, gates, ids


def rel_err(got: Any, want: Any) -> float:
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


def accuracy(check: Check) -> None:
    import torch

    from modula.kernels import ExpertStack, Residual, expert_mixture

    s, dev = check.sizes, check.device
    n, tokens = 8, s.rows[-1]
    out: dict[str, Any] = {}
    for dtype, bound in ((torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        name = str(dtype).removeprefix("torch.")
        if check.dry and dtype == torch.bfloat16:
            check.skip("accuracy", "bf16", "the interpreter's bf16 dot is wrong")
            continue
        for case in ("res", "moe", "res rows", "moe rows"):
            res, per_row = case.startswith("res"), case.endswith("rows")
            stack, residual = experts(s.d, n, dtype, dev, res)
            x, gates, ids = inputs(tokens, s.d, n, dtype, dev)
            kw: dict[str, Any] = {"residual": residual}
            if per_row:
                kw["expert_ids"] = ids
            else:
                kw["gates"] = gates
            x_in = x.view(tokens, 1, s.d) if per_row else x
            f32 = ExpertStack(stack.A.float(), stack.B.float(), stack.ranks, stack.scaling)
            r32 = Residual(residual.A.float(), residual.B.float(), 2.0) if res else None
            ref_kw = {**kw, "residual": r32}
            if "gates" in ref_kw:
                ref_kw["gates"] = gates.float()
            with torch.no_grad():
                want = expert_mixture(x_in.float(), f32, backend="reference", **ref_kw)
                tri = expert_mixture(x_in, stack, backend="triton", **kw)
                stk = expert_mixture(x_in, stack, backend="stacked", **kw)
            e_tri, e_stk = rel_err(tri, want), rel_err(stk, want)
            out[f"{name} {case}"] = {"triton": e_tri, "stacked": e_stk}
            short = {"bfloat16": "bf16", "float16": "fp16"}[name]
            check.add("accuracy", f"{short} {case}", f"triton {e_tri:.1e} (stacked {e_stk:.1e})",
                      f"<= {bound:.0e}", e_tri <= bound)
    check.data["accuracy"] = out


# ------------------------------------------------------------------------------------ 2 speed


def speed(check: Check) -> None:
    import torch
    import torch.nn.functional as F

    from modula.kernels import expert_mixture

    s, dev = check.sizes, check.device
    dtype = torch.float32 if check.dry else torch.bfloat16
    measure = timer(check)
    out: dict[str, Any] = {"mixture": [], "per_row": []}
    shapes = [(r, 1) for r in s.rows] + [s.prefill]
    W0 = (torch.randn(s.d, s.d) * s.d ** -0.5).to(device=dev, dtype=dtype)
    for n in s.experts:
        for rows, per in shapes:
            tokens = rows * per
            label = f"n{n} T{tokens}" + (" pre" if per > 1 else "")
            if check.left() < 20:
                check.skip("speed", label, "out of time budget")
                continue
            stack, residual = experts(s.d, n, dtype, dev, res=True, seed=n)
            x, gates, _ = inputs(tokens, s.d, n, dtype, dev)
            t: dict[str, float] = {}
            with torch.no_grad():
                t["base"] = measure(lambda x=x: F.linear(x, W0))
                for backend in ("triton", "stacked", "reference"):
                    t[backend] = measure(lambda b=backend, x=x, e=stack, g=gates, r=residual:
                                         expert_mixture(x, e, gates=g, residual=r, backend=b))
            ratio = t["reference"] / t["triton"]
            out["mixture"].append({"n": n, "tokens": tokens, "ms": t, "triton_vs_loop": ratio})
            target = ">= 4x loop" if n == 8 else ""
            check.add("speed", f"res {label}",
                      f"tri {t['triton']:.3f} stk {t['stacked']:.3f} loop {t['reference']:.3f}"
                      f" {ratio:.1f}x", target, ratio >= 4.0 if n == 8 else None)
            per_row = per_row_layer(check, n, rows, per, W0, dtype, measure)
            if per_row:
                out["per_row"].append({"n": n, "tokens": tokens, "ms": per_row})
                pr = per_row
                check.add("speed", f"row {label}",
                          f"tri {pr['triton']:.3f} stk {pr['stacked']:.3f} peft {pr['peft']:.3f}"
                          f" {pr['peft'] / pr['triton']:.1f}x")
    check.data["speed"] = out


def per_row_layer(check: Check, n: int, rows: int, per: int, W0: Any, dtype: Any,
                  measure: Callable[[Callable[[], Any]], float]) -> dict[str, float]:
    """A whole layer (W0 x + one LoRA per row) against PEFT's mixed-adapter batch on the same
    weights; returns milliseconds per backend and the largest difference from PEFT."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from modula.kernels import expert_mixture

    d, dev = check.sizes.d, check.device
    stack, _ = experts(d, n, dtype, dev, res=False, seed=100 + n)
    x = torch.randn(rows, per, d, device=dev, dtype=dtype)
    ids = (torch.arange(rows, device=dev) % n)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(d, d, bias=False, device=dev, dtype=dtype)

        def forward(self, t: Any) -> Any:
            return self.proj(t)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(W0)
    lora = LoraConfig(r=DOMAIN_RANK, lora_alpha=2 * DOMAIN_RANK, target_modules=["proj"])
    model = get_peft_model(holder, lora, adapter_name="d0", autocast_adapter_dtype=False)
    for i in range(1, n):
        model.add_adapter(f"d{i}", lora)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i in range(n):
            a, b = stack.expert(i)
            layer.lora_A[f"d{i}"].weight.copy_(a)
            layer.lora_B[f"d{i}"].weight.copy_(b)
    layer.to(device=dev, dtype=dtype)
    names = [f"d{int(i)}" for i in ids]

    def ours(backend: str) -> Callable[[], Any]:
        def run() -> Any:
            y = F.linear(x.view(-1, d), W0).view(rows, per, d)
            return expert_mixture(x, stack, expert_ids=ids, out=y, backend=backend)
        return run

    t: dict[str, float] = {}
    with torch.no_grad():
        diff = float((ours("triton")() - layer(x, adapter_names=names)).abs().max())
        for backend in ("triton", "stacked", "reference"):
            t[backend] = measure(ours(backend))
        t["peft"] = measure(lambda: layer(x, adapter_names=names))
    t["max_abs_diff_vs_peft"] = diff
    return t


# ------------------------------------------------------------------------------------ 3 engine


def tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over the model's whole vocabulary (``w3`` .. ``w<vocab-1>``),
    built here: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def random_llama(check: Check) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if check.dry else torch.bfloat16
    cfg = LlamaConfig(**check.sizes.model, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(check.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


def prompts(check: Check, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    lo, hi = check.sizes.prompt
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
            for _ in range(check.sizes.requests)]


def engine_run(check: Check, adapter: Any, tok: Any, reqs: list[list[int]],
               domains: list[str | None]) -> dict[str, float]:
    """All requests admitted at once (batch = requests), greedy, ``new_tokens`` each; decode
    tokens/s counts the steps after the first (which prefills every prompt)."""
    from modula.serving.engine import EngineCore
    from modula.serving.protocol import GenerationRequest, SamplingParams

    core = EngineCore(adapter, tok, max_running=len(reqs), gate_report="prompt")
    params = SamplingParams(max_tokens=check.sizes.new_tokens, temperature=0.0, ignore_eos=True)
    for i, (p, dom) in enumerate(zip(reqs, domains, strict=True)):
        core.add(GenerationRequest(f"r{i}", tuple(p), params, dom), adapter.expert_id(dom),
                 lambda ev: None)
    sync(check)
    t0 = time.perf_counter()
    core.step()
    sync(check)
    t1 = time.perf_counter()
    first = core.stats.tokens_out
    while core.has_work():
        core.step()
    sync(check)
    t2 = time.perf_counter()
    decode = core.stats.tokens_out - first
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": decode,
            "decode_tok_s": decode / max(t2 - t1, 1e-9), "mean_batch":
            core.stats.decode_rows / max(core.stats.decode_steps, 1)}


def generate_run(check: Check, model: Any, tok: Any, reqs: list[list[int]],
                 **kw: Any) -> dict[str, float]:
    """HF ``generate`` of the whole batch (left-padded), greedy; decode tokens/s = the tokens
    after the first over the time beyond a one-token (prefill) run."""
    import torch

    width = max(len(p) for p in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(reqs):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(check.device), mask.to(check.device)
    n = check.sizes.new_tokens

    def run(tokens: int) -> float:
        sync(check)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kw)
        sync(check)
        return time.perf_counter() - t0

    run(2)  # warm-up
    one, full = run(1), run(n)
    decode = len(reqs) * (n - 1)
    return {"prefill_s": one, "decode_s": full - one, "decode_tokens": decode,
            "decode_tok_s": decode / max(full - one, 1e-9)}


def randomize(model: Any, seed: int) -> None:
    """Trained-scale random experts and routers (B non-zero, so every expert computes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".B") or "router" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def engine(check: Check) -> Any:
    from peft import LoraConfig, get_peft_model

    from modula.config.schema import ModulaLayerConfig
    from modula.model import attach_modula, default_targets
    from modula.serving.engine import ModelAdapter, modula_adapter

    s = check.sizes
    base = random_llama(check)
    params = sum(p.numel() for p in base.parameters())
    tok = tokenizer(base.config.vocab_size)
    reqs = prompts(check, base.config.vocab_size)
    domains = [f"d{i}" for i in range(DOMAINS)]
    out: dict[str, Any] = {"parameters": params, "batch": len(reqs),
                           "new_tokens": s.new_tokens}
    check.add("engine", "model", f"Llama {params / 1e6:,.1f}M random, batch {len(reqs)}, "
                                 f"{s.new_tokens} new tokens")

    if not check.dry:  # warm-up
        engine_run(check, ModelAdapter(base), tok, reqs[:2], [None, None])
    out["base"] = engine_run(check, ModelAdapter(base), tok, reqs, [None] * len(reqs))
    base_tps = max(out["base"]["decode_tok_s"], 1e-9)
    check.add("engine", "bare base", f"{base_tps:,.0f} tok/s decode")

    model = attach_modula(base, ModulaLayerConfig(variant="res", universal_rank=UNIVERSAL_RANK,
                                                  domain_rank=DOMAIN_RANK), domains)
    randomize(model, 1)
    if check.dry:
        model.kernel_backend = "triton"  # interpreted on the CPU
    adapter = modula_adapter(model)
    pinned = [domains[i % DOMAINS] for i in range(len(reqs))]
    if not check.dry:  # warm-up: Triton compiles
        engine_run(check, adapter, tok, reqs[:2], pinned[:2])
    out["res_pinned"] = engine_run(check, adapter, tok, reqs, pinned)
    out["res_routed"] = engine_run(check, adapter, tok, reqs, [None] * len(reqs))
    out["kernel"] = model.kernel_backend
    res_tps = out["res_pinned"]["decode_tok_s"]
    share = res_tps / base_tps
    check.add("engine", "res pinned", f"{res_tps:,.0f} tok/s = {share:.0%} of base",
              ">= 85% base", share >= 0.85)
    routed = out["res_routed"]["decode_tok_s"]
    check.add("engine", "res routed", f"{routed:,.0f} tok/s = {routed / base_tps:.0%} of base")
    model.unload()

    if check.left() < 60 and not check.dry:
        check.skip("engine", "peft", "out of time budget")
        check.data["engine"] = out
        return base
    out["base_generate"] = generate_run(check, base, tok, reqs)
    lora = LoraConfig(r=DOMAIN_RANK, lora_alpha=2 * DOMAIN_RANK,
                      target_modules=default_targets(base), lora_dropout=0.0)
    # adapters in the base's bf16, as ours (PEFT would keep them in float32 by default)
    peft = get_peft_model(base, lora, adapter_name=domains[0], autocast_adapter_dtype=False)
    for name in domains[1:]:
        peft.add_adapter(name, lora)
    randomize(peft, 2)
    peft.to(check.device).eval()
    out["peft"] = generate_run(check, peft, tok, reqs, adapter_names=pinned)
    peft_tps = max(out["peft"]["decode_tok_s"], 1e-9)
    check.add("engine", "peft 1/request", f"{peft_tps:,.0f} tok/s; res = {res_tps / peft_tps:.1f}x",
              ">= 3x peft", res_tps / peft_tps >= 3.0)
    check.add("engine", "base generate",
              f"{out['base_generate']['decode_tok_s']:,.0f} tok/s (HF generate)")
    base = peft.unload()
    check.data["engine"] = out
    return base


# ------------------------------------------------------------------------------------ 4 training


def packed(check: Check, vocab: int) -> dict[str, Any]:
    """Rows of packed examples (positions restart every quarter row), prompts masked."""
    import torch

    rows, length = check.sizes.train_rows
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    seg = max(length // 4, 1)
    pos = (torch.arange(length) % seg).repeat(rows, 1)
    labels = ids.clone()
    labels[pos < seg // 4] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def training(check: Check, base: Any) -> None:
    import torch

    from modula.config.schema import ModulaLayerConfig
    from modula.model import attach_modula
    from modula.trainers.common import accumulated_step

    model = attach_modula(base, ModulaLayerConfig(variant="res", universal_rank=UNIVERSAL_RANK,
                                                  domain_rank=DOMAIN_RANK),
                          [f"d{i}" for i in range(DOMAINS)], adapter_dtype=torch.float32)
    randomize(model, 3)
    model.set_stage("router")
    model.train()
    batch = packed(check, base.config.vocab_size)
    tokens = batch["input_ids"].numel()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    out: dict[str, Any] = {"rows": check.sizes.train_rows, "tokens_per_step": tokens,
                           "trainable": sum(p.numel() for p in params)}
    cuda = check.device.type == "cuda"

    def step() -> float:
        loss, _ = accumulated_step(lambda b, _: model(**b, use_cache=False), [[batch]], opt,
                                   params, precision="bf16", device=check.device)
        return loss

    for ckpt in (True, False):
        label = "ckpt " + ("on" if ckpt else "off")
        if check.left() < 30 and not check.dry:
            check.skip("training", label, "out of time budget")
            continue
        if ckpt:
            model.enable_activation_checkpointing()
        else:
            hf = model.base_model
            (getattr(hf, "activation_checkpointing_disable", None)
             or hf.gradient_checkpointing_disable)()
        try:
            step()  # warm-up
            sync(check)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            n = 1 if check.dry else 3
            for _ in range(n):
                loss = step()
            sync(check)
            dt = (time.perf_counter() - t0) / n
        except torch.OutOfMemoryError:
            check.add("training", label, "out of GPU memory")
            opt.zero_grad(set_to_none=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        out[label] = {"tokens_per_s": tokens / dt, "peak_gib": peak, "step_s": dt,
                      "loss": loss}
        check.add("training", label, f"{tokens / dt:,.0f} tok/s, peak "
                                     + (f"{peak:.1f} GiB" if cuda else "n/a (CPU)"))
    model.unload()
    check.data["training"] = out


# ------------------------------------------------------------------------------------ output


def table(rows: list[Row], title: str) -> str:
    """The results as one plain-text table of at most 80 columns (a cell too long is cut
    with ``~``; the JSON has every number)."""
    head = ("check", "case", "result", "target", "met")
    widths = [8, 15, 0, 12, 3]
    widths[2] = WIDTH - sum(widths) - (len(widths) - 1)

    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else text[: w - 1] + "~"

    def line(cells: tuple[str, ...]) -> str:
        return " ".join(cut(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [cut(title, WIDTH), line(head), "-" * WIDTH]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        out.append(line((r.section, r.case, r.result, r.target, met)))
    return "\n".join(out)


def environment(check: Check) -> dict[str, Any]:
    import torch
    import transformers
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "dry_run": check.dry}
    if check.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, toy sizes, Triton interpreted (TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting measurements after this many seconds (default "
                         "%(default)s; the whole check must stay under 8 minutes)")
    ap.add_argument("--sections", default="accuracy,speed,engine,training",
                    help="comma list of accuracy, speed, engine, training")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT")
                    else None, help="folder for gpu_check.json / .txt (default: $OUT)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)} (see the docstring "
              "for carrying wheels)", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to run it on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
    check = Check(dry=args.dry_run, sizes=DRY if args.dry_run else GPU, device=device,
                  deadline=t_start + args.budget_s)
    check.data["environment"] = environment(check)
    print(f"gpu_check on {check.data['environment'].get('gpu', 'the CPU (dry run)')}",
          flush=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    base = None
    for name in ("accuracy", "speed", "engine", "training"):
        if name not in sections:
            continue
        t0 = time.monotonic()
        try:
            if name == "training":
                training(check, base if base is not None else random_llama(check))
            elif name == "engine":
                base = engine(check)
            else:
                globals()[name](check)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the rest
            traceback.print_exc()
            check.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            check.add(name, "error", f"{type(exc).__name__}: {exc}"[:200])
        check.data.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = time.monotonic() - t_start
    check.data["seconds"]["total"] = round(total, 1)
    check.data["rows"] = [r.__dict__ for r in check.rows]
    title = (f"gpu_check: {check.data['environment'].get('gpu', 'CPU dry run (toy sizes)')}, "
             f"{total:.0f} s")
    text = table(check.rows, title)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(check.data, indent=2, default=str))
        (args.out / "gpu_check.txt").write_text(text + "\n")
    print()
    print(text)
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
