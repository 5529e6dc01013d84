"""Losses and their gradients for each architecture, computed sparsely by hand.

JumpReLU follows Gemma Scope (arXiv 2408.05147, §2.2) and "Jumping Ahead" (arXiv 2407.14435):
loss = ||y - y_hat||^2 + lambda * L0, with straight-through estimators for the threshold using a
rectangle kernel of bandwidth eps:
    d JumpReLU(p; t) / dt = -(t / eps) * K((p - t) / eps)
    d H(p - t) / dt       = -(1 / eps) * K((p - t) / eps),   K(u) = 1[|u| < 1/2]
The threshold is trained directly (not as exp(log_t)), clamped at 0 after each step, as SAELens 6 does:
in log space Adam moves it by a factor ~(1 + lr) per step, so from its 0.001 start a short run never
reaches the ~0.1 thresholds that L0 ~ 50 needs.
`dense_loss` is the plain autograd version of the same objective; tests check one against the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemmascope.sparse import Active, DenseActive, Window, from_topk, pair_dots, select


@dataclass
class Objective:
    """What one SAE minimises; the trainer sets `coefficient` from its warm-up schedule each step."""

    architecture: str
    coefficient: float = 0.0
    """lambda: weight of the L0 penalty (jumprelu), of L1 (relu), or of the target-L0 penalty."""
    target_l0: float | None = None
    """If set (jumprelu), penalise coefficient * (L0 / target_l0 - 1)^2 instead of coefficient * L0."""
    k: int | None = None
    bandwidth: float = 0.001
    aux_k: int = 0
    """TopK/BatchTopK: reconstruct the residual with the top `aux_k` dead latents (0 = off)."""
    aux_coefficient: float = 1 / 32
    max_density: float = 0.02
    """Above this fraction of active entries, products run dense instead of sparse."""
    matmul_dtype: torch.dtype = torch.float32
    """Dtype of the encoder matmul, the one dense product; bfloat16 is ~2.5x faster on AVX512-BF16."""


@dataclass
class StepStats:
    loss: float
    mse: float
    fvu: float
    l0: float
    fired: Tensor  # (m,) tokens each latent fired on
    min_selected: float = (
        0.0  # batchtopk: smallest selected activation, for its inference threshold
    )


class Params(nn.Module):
    """Training parameters in normalised units, named as Gemma Scope's weights."""

    def __init__(self, d_in: int, d_sae: int, threshold: float, generator: torch.Generator) -> None:
        super().__init__()
        # W_dec He-uniform, each latent's row rescaled to unit norm; W_enc its transpose; biases zero.
        w = torch.empty(d_sae, d_in)
        bound = (6.0 / d_in) ** 0.5
        w.uniform_(-bound, bound, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.full((d_sae,), float(threshold)))


def encoder_pre(x: Tensor, p: Params, dtype: torch.dtype) -> Tensor:
    """`x @ W_enc + b_enc` in the parameters' dtype, the matmul optionally in a lower precision."""
    if dtype == p.W_enc.dtype:
        return torch.addmm(p.b_enc, x, p.W_enc)
    return (x.to(dtype) @ p.W_enc.to(dtype)).to(p.W_enc.dtype).add_(p.b_enc)


@torch.no_grad()
def forward_backward(
    p: Params, x: Tensor, y: Tensor, obj: Objective, dead: Tensor | None = None
) -> StepStats:
    """One step's loss and gradients (written to `.grad`) for inputs `x [B, d]` and targets `y [B, d]`."""
    B = x.shape[0]
    pre = encoder_pre(x, p, obj.matmul_dtype)  # (B, m)
    arch = obj.architecture
    window: Window | None = None
    min_selected = 0.0
    if arch in ("jumprelu", "relu"):
        theta = p.threshold if arch == "jumprelu" else torch.zeros_like(p.b_enc)
        half = obj.bandwidth / 2 if arch == "jumprelu" else 0.0
        act, window = select(pre, theta, half, obj.max_density)
    elif arch == "topk":
        vals, idx = pre.topk(obj.k, dim=-1, sorted=False)
        act = from_topk(idx, vals.relu(), pre.shape[1])
    elif arch == "batchtopk":
        act = _batch_topk(pre, obj.k)
        min_selected = float(act.val[act.val > 0].min()) if act.nnz else 0.0
    else:
        raise ValueError(f"unknown architecture {arch!r}")

    z = act.val  # active values, CSR order (or dense)
    y_hat = act.decode(z, p.W_dec).add_(p.b_dec)  # (B, d)
    err = y_hat - y
    sq = err.pow(2).sum()
    mse = float(sq) / B
    g = err.mul_(2.0 / B)  # dL/dy_hat, (B, d)
    l0 = act.nnz / B

    # Gradient at the active entries; the sparsity penalty joins here.
    dz = act.sampled(g, p.W_dec.T)  # dL/dz at active entries
    if arch == "relu":
        dz = dz + obj.coefficient / B * (act.mask if isinstance(act, DenseActive) else 1.0)
        penalty = obj.coefficient * float(z.sum()) / B
    elif arch == "jumprelu":
        penalty = _jumprelu_threshold_grad(p, g, window, obj, l0, B)
    else:
        penalty = 0.0
        if isinstance(act, Active):
            dz = dz * (z > 0)
    p.W_dec.grad = act.left_mul_t(z, g)  # (m, d)
    p.b_dec.grad = g.sum(0)
    p.W_enc.grad = act.left_mul_t(dz, x).T  # (d, m)
    p.b_enc.grad = act.col_sum(dz)
    if arch != "jumprelu":
        p.threshold.grad = torch.zeros_like(p.threshold)

    aux = 0.0
    if arch in ("topk", "batchtopk") and obj.aux_k and dead is not None and bool(dead.any()):
        aux = _aux_k(p, x, pre, y - y_hat, dead, obj)
    var = float((y - y.mean(0)).pow(2).sum())
    return StepStats(
        loss=mse + penalty + aux,
        mse=mse,
        fvu=float(sq) / max(var, 1e-12),
        l0=l0,
        fired=act.fired(),
        min_selected=min_selected,
    )


def _jumprelu_threshold_grad(
    p: Params, g: Tensor, window: Window, obj: Objective, l0: float, B: int
) -> float:
    """Threshold gradient from both STEs over the window; returns the penalty's value."""
    theta = p.threshold.detach()
    eps = obj.bandwidth
    r, c = window.rows, window.cols
    dz_w = pair_dots(r, c, g, p.W_dec)  # dL/dz at window entries, (n_window,)
    t_w = theta[c]
    # JumpReLU STE: dz * -(t / eps); L0 STE: dpenalty/dL0 * -(1 / eps) / B per entry.
    if obj.target_l0 is None:
        dpen_dl0 = obj.coefficient
        penalty = obj.coefficient * l0
    else:
        ratio = l0 / obj.target_l0 - 1.0
        dpen_dl0 = 2 * obj.coefficient * ratio / obj.target_l0
        penalty = obj.coefficient * ratio**2
    per_entry = dz_w * (-t_w / eps) - dpen_dl0 / (eps * B)
    d_theta = torch.zeros_like(theta).index_add_(0, c, per_entry)
    p.threshold.grad = d_theta
    return penalty


def _batch_topk(pre: Tensor, k: int) -> Active:
    """The `k * B` largest relu'd pre-activations of the batch, exactly, without a full sort.

    Each row contributes at most its own top `4k` candidates; if some row had all of them selected, it
    might have had more, and we redo the selection over the whole batch.
    """
    B, m = pre.shape
    n = k * B
    cand = min(m, 4 * k)
    vals, idx = pre.topk(cand, dim=-1, sorted=False)  # (B, cand)
    flat_vals, flat_pos = vals.reshape(-1).topk(n, sorted=False)
    rows = flat_pos // cand
    if cand < m and bool((torch.bincount(rows, minlength=B) == cand).any()):
        flat_vals, pos = pre.reshape(-1).topk(n, sorted=False)
        rows, cols = pos // m, pos % m
    else:
        cols = idx.reshape(-1)[flat_pos]
    key = rows * m + cols
    order = torch.argsort(key)
    rows, cols, flat_vals = rows[order], cols[order], flat_vals[order].relu()
    crow = torch.zeros(B + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return Active(crow, cols, flat_vals.contiguous(), m)


def _aux_k(
    p: Params, x: Tensor, pre: Tensor, residual: Tensor, dead: Tensor, obj: Objective
) -> float:
    """AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones missed."""
    B = x.shape[0]
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = min(obj.aux_k, dead_idx.numel())
    vals, local = pre[:, dead_idx].topk(k_aux, dim=-1, sorted=False)
    act = from_topk(dead_idx[local], vals.relu(), pre.shape[1])
    e_hat = act.decode(act.val, p.W_dec)  # (B, d)
    var = float((residual - residual.mean(0)).pow(2).sum()) / B
    scale = obj.aux_coefficient / max(var, 1e-12)
    diff = e_hat - residual
    loss = scale * float(diff.pow(2).sum()) / B
    g = diff.mul_(2.0 * scale / B)
    dz = act.sampled(g, p.W_dec.T) * (act.val > 0)
    p.W_dec.grad += act.left_mul_t(act.val, g)
    p.W_enc.grad += act.left_mul_t(dz, x).T
    p.b_enc.grad += act.col_sum(dz)
    return loss


# ------------------------------------------------------------------ reference (autograd, dense)
def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):  # noqa: D102
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        pre, theta = ctx.saved_tensors
        d_pre = (pre > theta) * grad
        d_theta = (-(theta / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad).sum(0)
        return d_pre, d_theta, None


class Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):  # noqa: D102
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        pre, theta = ctx.saved_tensors
        d_theta = (-(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad).sum(0)
        return torch.zeros_like(pre), d_theta, None


def dense_loss(p: Params, x: Tensor, y: Tensor, obj: Objective) -> Tensor:
    """The same objective as `forward_backward` (without AuxK) through autograd: the reference."""
    pre = x @ p.W_enc + p.b_enc
    if obj.architecture == "jumprelu":
        theta = p.threshold
        z = JumpReLU.apply(pre, theta, obj.bandwidth)
        l0 = Step.apply(pre, theta, obj.bandwidth).sum(-1).mean()
        if obj.target_l0 is None:
            penalty = obj.coefficient * l0
        else:
            penalty = obj.coefficient * (l0 / obj.target_l0 - 1) ** 2
    elif obj.architecture == "relu":
        z = pre.relu()
        penalty = obj.coefficient * z.sum(-1).mean()
    elif obj.architecture == "topk":
        vals, idx = pre.topk(obj.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        penalty = 0.0
    else:
        vals, pos = pre.reshape(-1).topk(obj.k * x.shape[0])
        z = torch.zeros_like(pre).reshape(-1).scatter(0, pos, vals.relu()).reshape(pre.shape)
        penalty = 0.0
    y_hat = z @ p.W_dec + p.b_dec
    return (y_hat - y).pow(2).sum(-1).mean() + penalty
