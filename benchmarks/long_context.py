"""Long packed rows on the CPU: one training step at ``max_length`` 4096 (not a test).

The built-in model's architecture (hidden 192, 4 layers, 6 heads) with MoDULA-Res (3 domains)
in the router stage, 2 packed rows of 4,096 tokens (positions restarting every 512), one thread;
each setting in its own process, so its peak RSS is its own. Prints CPU seconds per step,
tokens per CPU second and peak RSS in fp32, with and without gradient checkpointing, and with
the 2 rows as 2 accumulated micro-batches (``--bf16``: also bf16 autocast).

    .venv/bin/python benchmarks/long_context.py [--length 4096] [--rows 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bf16 is left out by default: without native bf16 matrix units a CPU emulates it, and one
# step took over 10 minutes here (`--bf16` adds it); gpu_check.py measures bf16 on a GPU
SETTINGS = [("fp32", False, 1), ("fp32", True, 1), ("fp32", False, 2)]


def one(precision: str, ckpt: bool, accum: int, length: int, rows: int) -> dict:
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from modula.config import ModulaLayerConfig
    from modula.model import attach_modula
    from modula.trainers.common import accumulated_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=192, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=length)
    model = attach_modula(LlamaForCausalLM(cfg), ModulaLayerConfig(variant="res"),
                          ["a", "b", "c"], adapter_dtype=torch.float32)
    model.set_stage("router")
    model.train()
    if ckpt:
        model.enable_activation_checkpointing()
    ids = torch.randint(3, 4096, (rows, length))
    pos = (torch.arange(length) % 512).repeat(rows, 1)
    labels = ids.clone()
    labels[pos < 128] = -100  # the prompts of the packed examples
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    size = rows // accum
    micro = [[{k: v[i:i + size] for k, v in batch.items()}] for i in range(0, rows, size)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def forward(b: dict, _: int) -> object:
        return model(**b, use_cache=False)

    accumulated_step(forward, micro, opt, params, precision=precision)  # warm-up
    t0 = time.process_time()
    loss, _ = accumulated_step(forward, micro, opt, params, precision=precision)
    dt = time.process_time() - t0
    return {"precision": precision, "checkpointing": ckpt, "micro_batches": accum,
            "tokens": rows * length, "cpu_s": round(dt, 2),
            "tokens_per_cpu_s": round(rows * length / dt), "loss": round(loss, 4),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also bf16 autocast (slow on a CPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # precision,ckpt,accum: run one setting
    args = ap.parse_args(argv)
    if args.one:
        p, c, a = args.one.split(",")
        print(json.dumps(one(p, c == "1", int(a), args.length, args.rows)))
        return 0
    print(f"{'precision':9s} {'ckpt':5s} {'micro':5s} {'CPU s':>7s} {'tok/CPU s':>9s} "
          f"{'peak RSS MiB':>12s} {'loss':>7s}")
    for p, c, a in SETTINGS + ([("bf16", False, 1), ("bf16", True, 1)] if args.bf16 else []):
        out = subprocess.run([sys.executable, __file__, "--one", f"{p},{int(c)},{a}",
                              "--length", str(args.length), "--rows", str(args.rows)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{p:9s} {'on' if c else 'off':5s} {a:5d} {r['cpu_s']:7.1f} "
              f"{r['tokens_per_cpu_s']:9d} {r['peak_rss_mib']:12d} {r['loss']:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
