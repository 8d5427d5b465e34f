"""``benchmarks/gpu_check.py``, the device check, is ready for a GPU machine: its dry run (CPU,
toy sizes, Triton interpreted) goes through every section with Ray and the packages the device
image lacks made unimportable, prints one table of at most 80 columns last and writes its JSON.
The GPU run itself has not happened on this machine (no GPU here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# what the device machine does not have: the check must not need any of it
ABSENT = ("ray", "pyarrow", "boto3", "rich", "fastapi", "typer", "httpx", "matplotlib")


def test_dry_run_without_ray(tmp_path, repo_root):
    code = (
        "import sys, runpy\n"
        f"for m in {ABSENT!r}: sys.modules[m] = None\n"
        "sys.argv = ['gpu_check.py', '--dry-run']\n"
        "try:\n"
        "    runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n"
        "finally:\n"
        f"    assert not any(sys.modules.get(m) for m in {ABSENT!r})\n"
    )
    env = {"OUT": str(tmp_path), "PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["seconds"]) == {"accuracy", "speed", "engine", "training", "total"}
    assert data["environment"]["dry_run"] is True
    # every section measured something, against the reference where there is one
    acc = data["accuracy"]
    assert set(acc) == {"float16 res", "float16 moe", "float16 res rows", "float16 moe rows"}
    assert all(v["triton"] < 1e-3 for v in acc.values()), acc
    assert data["speed"]["mixture"] and data["speed"]["per_row"]
    assert data["speed"]["per_row"][0]["ms"]["max_abs_diff_vs_peft"] < 1e-4
    eng = data["engine"]
    assert eng["kernel"] == "triton"
    for system in ("base", "res_pinned", "res_routed", "peft", "base_generate"):
        assert eng[system]["decode_tokens"] > 0, system
    assert {"ckpt on", "ckpt off"} <= set(data["training"])
    # the table comes last, at most 80 columns, and is the text file too
    table = (tmp_path / "gpu_check.txt").read_text().rstrip("\n")
    assert proc.stdout.rstrip("\n").endswith(table)
    lines = table.splitlines()
    assert lines[0].startswith("gpu_check: CPU dry run") and len(lines) > 15
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for want in ("fp16 res", ">= 4x loop", ">= 85% base", ">= 3x peft", "ckpt on"):
        assert want in table, want


def test_refuses_without_a_gpu(repo_root):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=repo_root,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
