"""The hand-written sparse gradients equal autograd's, and the STEs equal finite differences."""

import copy

import pytest
import torch

from gemmascope.train.dense import dense_forward_backward, dense_loss
from gemmascope.train.objectives import Objective, Params
from gemmascope.train.sparse import from_topk, pair_dots, select
from gemmascope.train.step import forward_backward

CASES = [
    ("jumprelu", {"coefficient": 0.3}),
    ("jumprelu", {"coefficient": 0.3, "target_l0": 5}),
    ("relu", {"coefficient": 0.1}),
    ("topk", {"k": 4}),
    ("batchtopk", {"k": 4}),
    # Matryoshka prefixes, and Gemma Scope 2's penalty on latents firing on over 5% of tokens
    ("jumprelu", {"coefficient": 0.3, "target_l0": 5, "prefixes": (8, 24),
                  "frequency_coefficient": 2.0, "max_frequency": 0.05}),
    ("relu", {"coefficient": 0.1, "prefixes": (16,)}),
    ("topk", {"k": 4, "prefixes": (8, 32)}),
    ("batchtopk", {"k": 4, "prefixes": (1, 63)}),
    # skip transcoders (`skip` is the parameters', not the objective's)
    ("jumprelu", {"coefficient": 0.3, "target_l0": 5, "skip": True}),
    ("topk", {"k": 4, "prefixes": (8, 32), "skip": True}),
]  # fmt: skip


def _case(kw: dict) -> tuple[dict, bool]:
    """The objective's options and whether the parameters have a skip connection."""
    kw = dict(kw)
    return kw, kw.pop("skip", False)


def _params(d=16, m=64, seed=0, skip=False) -> Params:
    p = Params(d, m, 0.001, torch.Generator().manual_seed(seed), skip=skip).double()
    with torch.no_grad():
        if skip:
            p.W_skip.normal_(0, 0.1)
        p.threshold.copy_(
            torch.rand(m, generator=torch.Generator().manual_seed(1)).mul(0.5).add(0.05)
        )
        p.b_enc.normal_(0, 0.1)
        p.b_dec.normal_(0, 0.1)
    return p


@pytest.mark.parametrize("max_density", [0.0, 0.05, 1.1], ids=["dense", "mixed", "sparse"])
@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_sparse_gradients_equal_autograd(arch, kw, max_density):
    torch.manual_seed(0)
    kw, skip = _case(kw)
    p = _params(skip=skip)
    x = torch.randn(256, 16, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)  # a transcoder-like target exercises x != y
    obj = Objective(arch, bandwidth=0.05, max_density=max_density, matmul_dtype=torch.float64, **kw)
    stats = forward_backward(p, x, y, obj)
    ours = {n: q.grad.clone() for n, q in p.named_parameters()}
    for q in p.parameters():
        q.grad = None
    loss = dense_loss(p, x, y, obj)
    loss.backward()
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    for n, q in p.named_parameters():
        ref = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(ours[n], ref, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("aux_k", [0, 3])
@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_torch_path_equals_sparse_path(arch, kw, aux_k):
    """The trainer's path off the CPU (dense autograd) gives the CPU kernels' loss and gradients."""
    torch.manual_seed(0)
    kw, skip = _case(kw)
    x = torch.randn(256, 16, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    dead = torch.arange(64) % 3 == 0
    obj = Objective(arch, bandwidth=0.05, matmul_dtype=torch.float64, aux_k=aux_k, **kw)
    results = []
    base = _params(skip=skip)
    for step in (forward_backward, dense_forward_backward):
        p = copy.deepcopy(base)
        stats = step(p, x, y, obj, dead)
        results.append((stats, {n: q.grad.clone() for n, q in p.named_parameters()}))
    (sparse, g_sparse), (dense, g_dense) = results
    for field in ("loss", "mse", "fvu", "l0", "min_selected"):
        assert getattr(dense, field) == pytest.approx(getattr(sparse, field), rel=1e-10), field
    torch.testing.assert_close(dense.fired, sparse.fired)
    for n, g in g_sparse.items():
        torch.testing.assert_close(g_dense[n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_threshold_ste_equals_finite_difference():
    """With a rectangle kernel, the STE is exactly a finite difference of width eps of the batch loss.

    d/dt sum_i H(p_i - t) ~ -(1/eps) #{|p_i - t| < eps/2}, and the central difference of step eps/2
    counts the same points. For JumpReLU the STE weights them by t instead of p_i: error <= eps/(2t).
    """
    torch.manual_seed(0)
    pre = torch.randn(200_000, 1, dtype=torch.float64)
    t, eps = 0.5, 0.01
    theta = torch.tensor([t], dtype=torch.float64)
    act, window = select(pre, theta, eps / 2, max_density=1.1)
    n_window = window.rows.numel()
    assert n_window > 500  # enough points for the check to mean something
    step_ste = -n_window / eps
    count = lambda th: float((pre > th).sum())  # noqa: E731
    step_fd = (count(t + eps / 2) - count(t - eps / 2)) / eps
    assert step_ste == pytest.approx(step_fd, rel=1e-12)
    jump_ste = -(t / eps) * n_window
    jsum = lambda th: float((pre * (pre > th)).sum())  # noqa: E731
    jump_fd = (jsum(t + eps / 2) - jsum(t - eps / 2)) / eps
    assert jump_ste == pytest.approx(jump_fd, rel=eps / (2 * t))
    assert act.nnz == int((pre > t).sum())


def test_threshold_gradient_matches_finite_difference_of_l0_penalty():
    """The L0 part of the threshold gradient equals a finite difference of lambda * L0."""
    torch.manual_seed(0)
    d, m, B, lam, eps = 8, 4, 50_000, 0.7, 0.01
    p = Params(d, m, 0.2, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        p.W_dec.zero_()  # no reconstruction term: only the L0 STE moves the threshold
    x = torch.randn(B, d, dtype=torch.float64) / d**0.5
    obj = Objective(
        "jumprelu", coefficient=lam, bandwidth=eps, max_density=1.1, matmul_dtype=torch.float64
    )
    forward_backward(p, x, torch.zeros_like(x), obj)
    theta = p.threshold.detach()
    pre = x @ p.W_enc.detach() + p.b_enc.detach()
    for c in range(m):
        t = float(theta[c])
        l0 = lambda th: lam * float((pre[:, c] > th).sum()) / B  # noqa: E731, B023
        fd = (l0(t + eps / 2) - l0(t - eps / 2)) / eps
        assert float(p.threshold.grad[c]) == pytest.approx(fd, rel=1e-9, abs=1e-12)


def test_select_and_sparse_products_match_dense():
    torch.manual_seed(0)
    pre = torch.randn(64, 300)
    theta = torch.rand(300) + 1.0
    act, window = select(pre, theta, 0.05, max_density=1.0)
    dense = pre * (pre > theta)
    W = torch.randn(300, 20)
    g = torch.randn(64, 20)
    torch.testing.assert_close(act.decode(act.val, W), dense @ W)
    torch.testing.assert_close(act.left_mul_t(act.val, g), dense.T @ g)
    full = g @ W.T
    torch.testing.assert_close(act.sampled(g, W.T), full[act.rows, act.cols])
    torch.testing.assert_close(act.fired(), (dense != 0).sum(0).float())
    near = ((pre - theta).abs() < 0.05).nonzero()
    assert sorted(zip(window.rows.tolist(), window.cols.tolist(), strict=True)) == sorted(
        map(tuple, near.tolist())
    )
    torch.testing.assert_close(
        pair_dots(window.rows, window.cols, g, W), full[window.rows, window.cols]
    )


def test_from_topk_sorts_columns():
    idx = torch.tensor([[5, 1, 3], [0, 9, 2]])
    vals = torch.tensor([[0.5, 0.1, 0.3], [1.0, 9.0, 2.0]])
    act = from_topk(idx, vals, 10)
    assert act.cols.tolist() == [1, 3, 5, 0, 2, 9]
    assert act.val.tolist() == pytest.approx([0.1, 0.3, 0.5, 1.0, 2.0, 9.0])


BLOCK_CASES = [*CASES, ("topk", {"k": 4, "aux_k": 8}), ("batchtopk", {"k": 4, "aux_k": 8})]


@pytest.mark.parametrize("max_density", [0.0, 0.05, 1.1], ids=["dense", "mixed", "sparse"])
@pytest.mark.parametrize(
    "arch,kw", BLOCK_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BLOCK_CASES)]
)
def test_latent_blocks_give_the_same_step(arch, kw, max_density):
    """A step over blocks of latents (dense blocks selected again, sparse ones kept, TopK merged
    across blocks, gradients of touched rows only) equals the one-block step."""
    kw, skip = _case(kw)
    torch.manual_seed(0)
    x = torch.randn(256, 16, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    dead = torch.arange(64) % 3 == 0
    results, p0 = [], _params(skip=skip)
    for block in (0, 7, 16):
        p = copy.deepcopy(p0)
        obj = Objective(arch, bandwidth=0.05, max_density=max_density, block=block,
                        matmul_dtype=torch.float64, **kw)  # fmt: skip
        stats = forward_backward(p, x, y, obj, dead)
        results.append((stats, {n: q.grad.clone() for n, q in p.named_parameters()}))
    (ref, ref_grads), *others = results
    for stats, grads in others:
        for key in ("loss", "mse", "fvu", "l0", "min_selected"):
            assert getattr(stats, key) == pytest.approx(getattr(ref, key), rel=1e-10), key
        assert torch.equal(stats.fired, ref.fired)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_streamed_selection_is_exact_when_one_row_dominates(arch):
    """A row 100x the others holds most of BatchTopK's batch-wide top k * B: streamed over blocks,
    the selection is still the whole matrix's."""
    torch.manual_seed(0)
    x = torch.randn(256, 16, dtype=torch.float64)
    x[3] *= 100
    p0, grads = _params(), []
    for block in (0, 5):
        p = copy.deepcopy(p0)
        obj = Objective(arch, k=4, aux_k=8, block=block, matmul_dtype=torch.float64)
        stats = forward_backward(p, x, x, obj, torch.arange(64) % 2 == 0)
        grads.append((stats.l0, stats.fired, {n: q.grad for n, q in p.named_parameters()}))
    (l0, fired, ref), (l0_b, fired_b, got) = grads
    assert l0_b == l0 and torch.equal(fired_b, fired)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
