"""The stacked backend against the reference loop: forward and gradients, every strategy.

Random shapes with odd sizes, 1..16 experts and 1..513 tokens; the Triton backend has its own
file (it runs under the interpreter).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from modula.kernels import (
    ExpertStack,
    Residual,
    expert_mixture,
    resolve_backend,
    stack_experts,
    triton_available,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_case(seed: int, kind: str, n: int, tokens: int, d_in: int, d_out: int, rows: int = 1):
    """x (rows, tokens/rows, d_in), an expert stack, optional Res residual, dense gates."""
    g = torch.Generator().manual_seed(seed)
    res = kind in ("res", "resn")  # resn: Res whose domain experts read h / RMS(h)
    d_e = d_out if res else d_in
    if kind == "flan":  # universal (rank 6) mixed with rank-3 domain experts
        ranks = [6] + [3] * (n - 1)
        scal = [2.0] + [1.5] * (n - 1)
    else:
        ranks = [3] * n
        scal = [1.5] * n
    A = [(torch.randn(r, d_e, generator=g) / d_e**0.5).requires_grad_() for r in ranks]
    B = [(torch.randn(d_out, r, generator=g) / r**0.5).requires_grad_() for r in ranks]
    residual = None
    if res:
        residual = Residual(
            (torch.randn(5, d_in, generator=g) / d_in**0.5).requires_grad_(),
            (torch.randn(d_out, 5, generator=g) / 3).requires_grad_(),
            2.0,
            1e-6 if kind == "resn" else None,
        )
    x = torch.randn(rows, tokens // rows, d_in, generator=g).requires_grad_()
    logits = torch.randn(rows, tokens // rows, n, generator=g).requires_grad_()
    return x, A, B, scal, residual, logits


def _random_cases(count: int, seed: int = 1234):
    rng = random.Random(seed)
    kinds = ("mixture", "flan", "res", "resn")
    cases = [
        ("res", 8, 513, 37, 29, 1),  # the extremes are always present
        ("resn", 5, 200, 17, 33, 2),
        ("mixture", 16, 1, 17, 9, 1),
        ("flan", 1, 64, 5, 7, 1),
        ("res", 1, 3, 3, 5, 3),
    ]
    while len(cases) < count:
        rows = rng.choice([1, 2, 3, 4])
        tokens = rows * rng.randint(1, 513 // rows)
        kind = rng.choice(kinds)
        d_out = rng.choice([1, 7, 16, 31, 64])
        if kind == "resn":
            # h / RMS(h) is ill-conditioned where RMS(h) ~ sqrt(eps): with one or a few
            # outputs that happens on some tokens, and float32 rounding of h itself shows
            d_out = max(d_out, 16)
        cases.append(
            (kind, rng.randint(1, 16), tokens, rng.choice([3, 5, 17, 33, 48, 65]), d_out, rows)
        )
    return cases


CASES = _random_cases(18)


def _grads(out, leaves):
    leaves = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.1, allow_unused=True)


@pytest.mark.parametrize("kind,n,tokens,d_in,d_out,rows", CASES)
def test_stacked_matches_reference_dense(kind, n, tokens, d_in, d_out, rows):
    x, A, B, scal, residual, logits = make_case(tokens * 31 + n, kind, n, tokens, d_in, d_out, rows)
    leaves = [x, *A, *B, logits] + ([residual.A, residual.B] if residual else [])
    outs = {}
    grads = {}
    for backend in ("reference", "stacked"):
        gates = torch.softmax(logits, -1)
        out = expert_mixture(
            x, stack_experts(A, B, scal), gates=gates, residual=residual, backend=backend
        )
        outs[backend] = out
        grads[backend] = _grads(out, leaves)
    torch.testing.assert_close(outs["stacked"], outs["reference"], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads["stacked"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the output is not trivially zero, so the comparison means something
    assert outs["reference"].abs().max() > 1e-3


@pytest.mark.parametrize("kind,n,tokens,d_in,d_out,rows", CASES[:10])
def test_stacked_matches_reference_per_row(kind, n, tokens, d_in, d_out, rows):
    x, A, B, scal, residual, logits = make_case(tokens + n, kind, n, tokens, d_in, d_out, rows)
    ids = torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(n))
    leaves = [x, *A, *B] + ([residual.A, residual.B] if residual else [])
    ref = expert_mixture(x, stack_experts(A, B, scal), expert_ids=ids, residual=residual, backend="reference")
    got = expert_mixture(x, stack_experts(A, B, scal), expert_ids=ids, residual=residual, backend="stacked")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(_grads(got, leaves), _grads(ref, leaves), strict=True):
        if g2 is None:
            assert g1 is None or g1.abs().max() == 0
        else:
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixture", "flan", "res", "resn"])
def test_per_row_equals_one_hot_gates(kind):
    """Pinning a row to expert k is exactly the dense mixture with one-hot gates; short rows
    (decoding) take the grouped strategy, long rows the per-row one: both are checked."""
    for per_row_tokens in (1, 40):
        x, A, B, scal, residual, _ = make_case(7, kind, 5, 4 * per_row_tokens, 19, 23, rows=4)
        ids = torch.tensor([3, 0, 4, 3])
        one_hot = F.one_hot(ids, 5).float()[:, None, :].expand(4, per_row_tokens, 5)
        with torch.no_grad():
            stack = stack_experts(A, B, scal)
            pinned = expert_mixture(x, stack, expert_ids=ids, residual=residual, backend="stacked")
            dense = expert_mixture(x, stack, gates=one_hot, residual=residual, backend="reference")
        torch.testing.assert_close(pinned, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixture", "res", "resn"])
def test_mixed_pinned_and_routed_rows(kind):
    x, A, B, scal, residual, logits = make_case(3, kind, 4, 30, 11, 13, rows=3)
    gates = torch.softmax(logits, -1).detach()
    ids = torch.tensor([2, -1, 0])
    with torch.no_grad():
        stack = stack_experts(A, B, scal)
        got = expert_mixture(x, stack, gates=gates, expert_ids=ids, residual=residual, backend="stacked")
        routed = expert_mixture(x, stack, gates=gates, residual=residual, backend="reference")
        for row, e in ((0, 2), (2, 0)):
            alone = expert_mixture(
                x[row : row + 1], stack, expert_ids=torch.tensor([e]), residual=residual,
                backend="reference",
            )
            torch.testing.assert_close(got[row], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], routed[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixture", "flan", "res", "resn"])
def test_top_k_gates_take_the_grouped_path_and_match(kind, monkeypatch):
    from modula.kernels import stacked

    calls = []
    real = stacked._grouped
    monkeypatch.setattr(stacked, "_grouped", lambda *a: calls.append(1) or real(*a))
    n, k = 12, 1  # gate density 1/12: below the grouped strategy's threshold
    x, A, B, scal, residual, logits = make_case(11, kind, n, 200, 21, 17)
    top, idx = logits.detach().topk(k, -1)
    gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
    ref = expert_mixture(x, stack_experts(A, B, scal), gates=gates, residual=residual, backend="reference")
    got = expert_mixture(x, stack_experts(A, B, scal), gates=gates, residual=residual, backend="stacked")
    assert calls == [1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    leaves = [x, *A, *B] + ([residual.A, residual.B] if residual else [])
    for g1, g2 in zip(_grads(got, leaves), _grads(ref, leaves), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_no_gates_means_every_expert_at_weight_one():
    x, A, B, scal, residual, _ = make_case(5, "res", 1, 9, 8, 6)
    stack = stack_experts(A, B, scal)
    got = expert_mixture(x, stack, residual=residual, backend="stacked")
    h = residual.scaling * (x @ residual.A.t() @ residual.B.t())
    want = h + scal[0] * F.leaky_relu(h @ A[0].t(), 0.01) @ B[0].t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    only_h = expert_mixture(x, None, residual=residual, backend="stacked")
    torch.testing.assert_close(only_h, h, rtol=1e-5, atol=1e-6)


def test_negative_slope_is_used():
    x, A, B, scal, residual, _ = make_case(5, "res", 2, 9, 8, 6)
    stack = stack_experts(A, B, scal)
    a = expert_mixture(x, stack, residual=residual, negative_slope=0.0, backend="stacked")
    b = expert_mixture(x, stack, residual=residual, negative_slope=0.3, backend="stacked")
    ref = expert_mixture(x, stack, residual=residual, negative_slope=0.3, backend="reference")
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "stacked"])
def test_out_is_accumulated_in_place(backend):
    x, A, B, scal, residual, logits = make_case(5, "flan", 3, 12, 8, 6)
    gates = torch.softmax(logits, -1)
    with torch.no_grad():
        base = torch.randn(1, 12, 6)
        out = base.clone()
        stack = stack_experts(A, B, scal)
        result = expert_mixture(x, stack, gates=gates, out=out, backend=backend)
        delta = expert_mixture(x, stack, gates=gates, backend="reference")
    assert result is out
    torch.testing.assert_close(out, base + delta, rtol=1e-5, atol=1e-6)


def test_stack_and_argument_checks():
    x, A, B, scal, residual, logits = make_case(5, "mixture", 3, 4, 8, 6)
    stack = stack_experts(A, B, scal)
    assert stack.offsets == (0, 3, 6, 9) and stack.uniform_rank == 3
    with pytest.raises(ValueError, match="gates must be"):
        expert_mixture(x, stack, gates=torch.ones(1, 4, 2))
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[-1, 2\]"):
        expert_mixture(x, stack, expert_ids=torch.tensor([3]))
    with pytest.raises(ValueError, match="no gates"):
        expert_mixture(x, stack, expert_ids=torch.tensor([-1]))
    with pytest.raises(ValueError, match="cast"):
        expert_mixture(x.double(), stack)
    with pytest.raises(ValueError, match="not a LoRA pair"):
        stack_experts([A[0]], [B[0].t()], 1.0)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        expert_mixture(x, stack, backend="cuda")
    with pytest.raises(ValueError, match="need the same number"):
        stack_experts([], [], 1.0)
    with pytest.raises(ValueError, match="ranks"):
        ExpertStack(stack.A, stack.B, (3, 3), (1.0, 1.0))
    with pytest.raises(ValueError, match="Res domain experts read"):
        expert_mixture(x, stack, residual=Residual(torch.randn(2, 8), torch.randn(7, 2), 1.0))


def test_auto_backend_is_stacked_on_cpu():
    x = torch.randn(2, 3)
    assert resolve_backend("auto", x) == "stacked"
    assert resolve_backend("reference", x) == "reference"
    assert isinstance(triton_available(), bool)


def test_empty_input():
    _, A, B, scal, _, _ = make_case(5, "mixture", 3, 4, 8, 6)
    out = expert_mixture(torch.randn(0, 8), stack_experts(A, B, scal), backend="stacked")
    assert out.shape == (0, 6)


@pytest.mark.parametrize("kind", ["mixture", "flan", "res", "resn"])
def test_precomputed_shrink_gives_the_same_values_and_gradients(kind):
    """A layer shares one GEMM between its router and the experts' shrink (``shrunk=``)."""
    x, A, B, scal, residual, logits = make_case(21, kind, 4, 30, 13, 11)
    leaves = [x, *A, *B, logits] + ([residual.A, residual.B] if residual else [])
    results = []
    for share in (False, True):
        stack = stack_experts(A, B, scal)
        first = residual.A if residual else stack.A
        shared = torch.cat([first, torch.eye(4, 13)])  # any "router" rows
        both = x @ shared.t()
        shrunk = both[..., : first.shape[0]] if share else None
        out = expert_mixture(
            x, stack, gates=torch.softmax(logits, -1), residual=residual, shrunk=shrunk,
            backend="stacked",
        ) + both[..., first.shape[0]:].sum() * 0
        results.append((out, _grads(out, leaves)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shrunk must be"):
        expert_mixture(x, stack_experts(A, B, scal), residual=residual, shrunk=torch.ones(2, 2))


# ---- the fused inference path (kernels/fused.py) ------------------------------------------


@pytest.mark.parametrize("kind", ["mixture", "flan", "res", "resn"])
@pytest.mark.parametrize("fuse_base", [True, False])
def test_fused_members_equal_reference_each(kind, fuse_base):
    """Three linears of different widths reading one input, fused (with or without their base
    and biases in the GEMM), against each member's W0 x + b + reference mixture."""
    from modula.kernels.fused import FusedMember, fuse_linears, fused_forward

    rows, per_row, d_in, n = 3, 5, 19, 4
    x = torch.randn(rows, per_row, d_in, generator=torch.Generator().manual_seed(2))
    x2 = x.reshape(-1, d_in)
    members, bases, want = [], [], []
    for j, d_out in enumerate((23, 11, 11)):
        _, A, B, scal, residual, _ = make_case(40 + j, kind, n, rows * per_row, d_in, d_out,
                                               rows=rows)
        stack = stack_experts([a.detach() for a in A], [b.detach() for b in B], scal)
        if residual is not None:
            residual = Residual(residual.A.detach(), residual.B.detach(), residual.scaling,
                                residual.norm_eps)
        W0 = torch.randn(d_out, d_in)
        bias = torch.randn(d_out) if j != 1 else None
        router = torch.randn(n, d_in)
        gates = torch.softmax(x @ router.t(), -1)
        base = x2 @ W0.t() + (bias if bias is not None else 0)
        delta = expert_mixture(x, stack, gates=gates, residual=residual, backend="reference")
        want.append(base.view(rows, per_row, d_out) + delta)
        bases.append(base)
        members.append(FusedMember(W0 if fuse_base else None, bias if fuse_base else None,
                                   residual, stack, router, res_domains=residual is not None))
    f = fuse_linears(members, 0.01)
    outs, used = fused_forward(f, x2, (rows, per_row), lambda lg: torch.softmax(lg, -1),
                               None if fuse_base else bases)
    for got, ref in zip(outs, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert used.shape == (rows, per_row, 3, n)
    bad = members[1]._replace(router=torch.randn(n + 1, d_in))
    with pytest.raises(ValueError, match="router rows"):
        fuse_linears([members[0], bad])
    with pytest.raises(ValueError, match="share their input width"):
        fuse_linears([members[0], members[1]._replace(router=None)])
