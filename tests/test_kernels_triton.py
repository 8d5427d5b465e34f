"""The Triton backend against the reference, on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated; ``modula.kernels`` decorates lazily and
per mode, so setting the variable for this module (and only this module) is enough. The
interpreter is slow and its bf16 ``tl.dot`` is wrong: fp32 and fp16 only, small grids.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modula.kernels import Residual, expert_mixture, stack_experts, triton_available

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert triton_available()
        yield


def case(seed, kind, n, rows, per_row, d_in, d_out, dtype):
    g = torch.Generator().manual_seed(seed)
    res = kind in ("res", "resn")  # resn: domain experts read h / RMS(h)
    d_e = d_out if res else d_in
    ranks = [16] + [8] * (n - 1) if kind == "flan" else [8] * n
    scal = [2.0] + [1.5] * (n - 1) if kind == "flan" else [1.5] * n
    A = [(torch.randn(r, d_e, generator=g) / d_e**0.5).to(dtype) for r in ranks]
    B = [(torch.randn(d_out, r, generator=g) / r**0.5).to(dtype) for r in ranks]
    residual = (
        Residual(
            (torch.randn(16, d_in, generator=g) / d_in**0.5).to(dtype),
            (torch.randn(d_out, 16, generator=g) / 4).to(dtype),
            2.0,
            1e-6 if kind == "resn" else None,
        )
        if res
        else None
    )
    x = torch.randn(rows, per_row, d_in, generator=g).to(dtype)
    gates = torch.softmax(torch.randn(rows, per_row, n, generator=g), -1).to(dtype)
    return x, stack_experts(A, B, scal), residual, gates


def reference(x, stack, residual, **kw):
    """The oracle in float32, whatever the input dtype."""
    f = lambda t: t.float() if t is not None else None  # noqa: E731
    stack32 = type(stack)(stack.A.float(), stack.B.float(), stack.ranks, stack.scaling)
    res32 = (Residual(f(residual.A), f(residual.B), residual.scaling, residual.norm_eps)
             if residual else None)
    kw = {k: (f(v) if k == "gates" else v) for k, v in kw.items()}
    return expert_mixture(x.float(), stack32, residual=res32, backend="reference", **kw)


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "kind,n,rows,per_row,d_in,d_out",
    [
        ("flan", 3, 2, 9, 33, 24),  # mixed ranks (16 + 8)
        ("res", 4, 1, 5, 20, 17),
        ("resn", 3, 2, 4, 20, 17),
        ("mixture", 1, 1, 1, 16, 16),  # one token, one expert
    ],
)
def test_dense_and_per_row_match_reference(dtype, kind, n, rows, per_row, d_in, d_out):
    x, stack, residual, gates = case(n + rows, kind, n, rows, per_row, d_in, d_out, dtype)
    ids = torch.arange(rows) % n
    for kw in ({"gates": gates}, {"expert_ids": ids}):
        with torch.no_grad():
            got = expert_mixture(x, stack, residual=residual, backend="triton", **kw)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), reference(x, stack, residual, **kw), **TOL[dtype])


def test_many_tokens_many_experts_and_accumulation():
    x, stack, residual, gates = case(3, "mixture", 16, 1, 513, 24, 20, torch.float32)
    base = torch.randn(1, 513, 20)
    out = base.clone()
    with torch.no_grad():
        result = expert_mixture(x, stack, gates=gates, out=out, backend="triton")
    assert result is out
    torch.testing.assert_close(out, base + reference(x, stack, None, gates=gates), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mixture", "res", "resn"])
def test_mixed_batch_pinned_and_routed_rows(kind):
    x, stack, residual, gates = case(4, kind, 5, 4, 6, 19, 21, torch.float32)
    ids = torch.tensor([4, -1, 0, 2])
    with torch.no_grad():
        got = expert_mixture(x, stack, gates=gates, expert_ids=ids, residual=residual, backend="triton")
    want = reference(x, stack, residual, gates=gates, expert_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_zero_gates_skip_blocks_but_stay_exact():
    """Top-k gates leave whole tiles at zero; the kernels skip them and must agree."""
    x, stack, residual, _ = case(6, "res", 8, 1, 40, 18, 18, torch.float32)
    logits = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(2))
    top, idx = logits.topk(2, -1)
    gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
    gates[:, :, 4:] = 0  # an entire rank tile without any gate
    with torch.no_grad():
        got = expert_mixture(x, stack, gates=gates, residual=residual, backend="triton")
    torch.testing.assert_close(got, reference(x, stack, residual, gates=gates), rtol=1e-4, atol=1e-4)


def test_tile_flags_mark_only_tiles_with_live_gates():
    from modula.kernels.triton_kernels import tile_flags

    active = torch.zeros(40, 4, dtype=torch.bool)
    active[0, 1] = True  # row block 0, expert 1
    active[35, 3] = True  # row block 2, expert 3
    col_group = torch.arange(4).repeat_interleave(8)  # 4 experts of rank 8, column blocks of 16
    flags = tile_flags(active, col_group, 16, 16)
    assert flags.tolist() == [[1, 0], [0, 0], [0, 1]]


@pytest.mark.parametrize("kind", ["flan", "res", "resn"])
def test_gradients_through_the_autograd_wrapper(kind):
    x, stack, residual, gates = case(8, kind, 3, 2, 7, 17, 19, torch.float32)
    A = [t.clone().requires_grad_() for t in (stack.expert(i)[0] for i in range(3))]
    B = [t.clone().requires_grad_() for t in (stack.expert(i)[1] for i in range(3))]
    x.requires_grad_()
    logits = torch.log(gates).requires_grad_()
    res = Residual(residual.A.clone().requires_grad_(), residual.B.clone().requires_grad_(), 2.0) if residual else None
    leaves = [x, logits, *A, *B] + ([res.A, res.B] if res else [])
    grads = {}
    for backend in ("triton", "reference"):
        out = expert_mixture(
            x, stack_experts(A, B, stack.scaling), gates=F.softmax(logits, -1), residual=res,
            backend=backend,
        )
        grads[backend] = torch.autograd.grad((out * out).sum(), leaves)
    for g1, g2 in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_without_interpreter_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, stack, residual, gates = case(1, "mixture", 2, 1, 3, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        expert_mixture(x, stack, gates=gates, backend="triton")
