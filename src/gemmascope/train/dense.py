"""The trainer's path off the CPU: the same objective through autograd, on dense tensors.

`objectives.forward_backward` runs sparse numba kernels, which only exist for the CPU. On CUDA and
MPS the trainer calls `dense_forward_backward` instead: the same loss, the same straight-through
estimators (`JumpReLU`, `Step` below), the same handling of a `Partition` over ranks and the
same `StepStats`; tests check the two give the same gradients. It costs 10 * d * m FLOPs per token
(2 products forward, 3 backward) where the sparse path's dense part is the encoder's 2 * d * m.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from gemmascope.common.distributed import Partition
from gemmascope.train.objectives import ALONE, Objective, Params, StepStats, centered_sq
from gemmascope.train.topk import batch_threshold, row_topk
from gemmascope.train.topk import n_dead as _n_dead


# The straight-through estimators of JumpReLU and of its L0 (rectangle kernel, see `objectives`).
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


class _Summed(torch.autograd.Function):
    """Sum a partial result over ranks; backward passes the gradient through unchanged.

    Every rank computes the same loss from the summed tensor, so each already holds the whole
    gradient of its part; an all-reduce in backward would count it once per rank.
    """

    @staticmethod
    def forward(ctx, t, reduce):  # noqa: D102
        return reduce(t.detach().clone())

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """`a @ b` with the product in `dtype`, the result in `b`'s dtype (autograd casts the gradients)."""
    if dtype == b.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(b.dtype)


def dense_loss(
    p: Params,
    x: Tensor,
    y: Tensor,
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
) -> Tensor:
    """The objective of `objectives.forward_backward` as a tensor to back-propagate (AuxK too when
    `dead` is given): the autograd reference the sparse kernels are tested against."""
    with torch.enable_grad():
        return _terms(p, x, y, obj, dead, split).loss


def dense_forward_backward(
    p: Params,
    x: Tensor,
    y: Tensor,
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
) -> StepStats:
    """`forward_backward` through autograd on dense tensors: the trainer's path off the CPU.

    Same objective, straight-through estimators, split semantics and `StepStats`. The encoder and
    decoder products run in `obj.matmul_dtype` (bfloat16/float16 use tensor cores); thresholds, the
    STEs, the loss and the gradients stay in the parameters' dtype.
    """
    for q in p.parameters():
        q.grad = None
    with torch.enable_grad():
        t = _terms(p, x, y, obj, dead, split)
        t.loss.backward()
    for q in p.parameters():
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    mse = float(split.over_rows(t.sq.detach().clone())) / t.B
    prefixes = float(split.over_rows(t.sq_prefixes.detach().clone())) / t.B
    return StepStats(
        loss=prefixes + float(t.penalty.detach()) + t.aux,
        mse=mse,
        fvu=mse * t.B / max(centered_sq(y, split), 1e-12),
        l0=float(t.l0.detach()),
        fired=split.over_rows(t.mask.sum(0).to(p.W_enc.dtype)),
        min_selected=t.min_selected,
    )


@dataclass
class _Terms:
    """The parts of one step's loss, kept for its statistics."""

    loss: Tensor
    sq: Tensor  # sum of squared errors over this rank's rows
    sq_prefixes: Tensor  # the same summed over the nested prefixes (Matryoshka; else = sq)
    penalty: Tensor
    l0: Tensor
    mask: Tensor  # (B_local, m_local) active entries
    min_selected: float
    aux: float
    B: int  # rows of the whole batch


def _terms(
    p: Params, x: Tensor, y: Tensor, obj: Objective, dead: Tensor | None, split: Partition
) -> _Terms:
    B = int(split.over_rows(torch.tensor(x.shape[0], device=x.device)))
    pre = _mm(x, p.W_enc, obj.matmul_dtype) + p.b_enc  # (B_local, m_local)
    z, mask, counts, min_selected = _dense_select(pre, p, obj, B, split)
    bounds = obj.bounds(p.W_dec.shape[0])
    # The reconstruction of each nested prefix (Matryoshka; one prefix, the whole dictionary, else)
    y_hat = p.b_dec if p.W_skip is None else p.b_dec + x @ p.W_skip
    sqs = []
    for lo, hi in itertools.pairwise(bounds):
        part = _mm(z[:, lo:hi], p.W_dec[lo:hi], obj.matmul_dtype)  # (B_local, d)
        y_hat = y_hat + (part if len(bounds) > 2 else _Summed.apply(part, split.over_latents))
        sqs.append((y_hat - y).pow(2).sum())
    sq = sqs[-1]
    l0 = _Summed.apply(counts.sum(), split.over_all) / B
    if obj.architecture == "jumprelu":
        penalty = obj.l0_penalty(l0)
        if obj.frequency_coefficient:
            freq = _Summed.apply(counts, split.over_rows) / B  # (m_local,)
            over = (freq / obj.max_frequency - 1).clamp(min=0)
            penalty = penalty + obj.frequency_coefficient * _Summed.apply(
                over.pow(2).sum(), split.over_latents
            )
    elif obj.architecture == "relu":
        penalty = obj.coefficient * _Summed.apply(z.sum(), split.over_all) / B
    else:
        penalty = torch.zeros((), device=x.device)
    loss = sum(sqs) / B + penalty
    aux = 0.0
    if obj.architecture in ("topk", "batchtopk") and obj.aux_k and _n_dead(dead, split):
        aux_loss, aux = _dense_aux_k(p, pre, (y - y_hat).detach(), dead, obj, B, split)
        loss = loss + aux_loss
    return _Terms(loss, sq, sum(sqs), penalty, l0, mask, min_selected, aux, B)  # type: ignore[arg-type]


def _dense_select(
    pre: Tensor, p: Params, obj: Objective, B: int, split: Partition
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Latent values `z`, the active mask, the tokens each latent fires on `[m]` (differentiable
    for JumpReLU's L0 STE) and, for BatchTopK, the smallest positive selected value."""
    arch = obj.architecture
    min_selected = 0.0
    if arch == "jumprelu":
        z = JumpReLU.apply(pre, p.threshold, obj.bandwidth)
        mask = pre.detach() > p.threshold.detach()
        return z, mask, Step.apply(pre, p.threshold, obj.bandwidth).sum(0), 0.0
    if arch == "relu":
        z = pre.relu()
        mask = pre.detach() > 0
    elif arch == "topk":
        vals, cols, won = row_topk(pre, obj.k, split)
        won = torch.ones_like(vals, dtype=torch.bool) if won is None else won
        z = torch.zeros_like(pre).scatter(1, cols, vals.relu() * won)
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, cols, won)
    elif arch == "batchtopk":
        mask = pre.detach() >= batch_threshold(pre.detach(), obj.k * B, obj.k, split)
        z = pre.relu() * mask
        pos = pre.detach()[mask & (pre.detach() > 0)]
        least = pos.min() if pos.numel() else torch.tensor(float("inf"), device=pre.device)
        min_selected = float(split.min_all(least.float()))
        min_selected = 0.0 if min_selected == float("inf") else min_selected
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return z, mask, mask.sum(0).to(pre.dtype), min_selected


def _dense_aux_k(
    p: Params, pre: Tensor, residual: Tensor, dead: Tensor, obj: Objective, B: int, split: Partition
) -> tuple[Tensor, float]:
    """AuxK on dense tensors: the loss to back-propagate (this rank's rows) and its global value."""
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = min(obj.aux_k, _n_dead(dead, split))
    vals, cols, won = row_topk(pre[:, dead_idx], k_aux, split)
    v = vals.relu() if won is None else vals.relu() * won
    z = torch.zeros_like(pre).scatter(1, dead_idx[cols], v)  # (B_local, m_local)
    e_hat = _Summed.apply(_mm(z, p.W_dec, obj.matmul_dtype), split.over_latents)
    scale = obj.aux_coefficient / max(centered_sq(residual, split) / B, 1e-12)
    sq = (e_hat - residual).pow(2).sum()
    return scale * sq / B, scale * float(split.over_rows(sq.detach().clone())) / B
