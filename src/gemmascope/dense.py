"""The trainer's path off the CPU: the same objective through autograd, on dense tensors.

`objectives.forward_backward` runs sparse numba kernels, which only exist for the CPU. On CUDA and
MPS the trainer calls `dense_forward_backward` instead: the same loss, the same straight-through
estimators (`objectives.JumpReLU`, `objectives.Step`), the same handling of a `Split` over ranks and the
same `StepStats`; tests check the two give the same gradients. It costs 10 * d * m FLOPs per token
(2 products forward, 3 backward) where the sparse path's dense part is the encoder's 2 * d * m.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmascope.distributed import Split
from gemmascope.objectives import (
    ALONE,
    JumpReLU,
    Objective,
    Params,
    Step,
    StepStats,
    _n_dead,
    batch_threshold,
    centered_sq,
    row_topk,
)


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


def dense_forward_backward(
    p: Params,
    x: Tensor,
    y: Tensor,
    obj: Objective,
    dead: Tensor | None = None,
    split: Split = ALONE,
) -> StepStats:
    """`forward_backward` through autograd on dense tensors: the trainer's path off the CPU.

    Same objective, straight-through estimators, split semantics and `StepStats`. The encoder and
    decoder products run in `obj.matmul_dtype` (bfloat16/float16 use tensor cores); thresholds, the
    STEs, the loss and the gradients stay in the parameters' dtype.
    """
    B = int(split.over_rows(torch.tensor(x.shape[0], device=x.device)))
    for q in p.parameters():
        q.grad = None
    with torch.enable_grad():
        pre = _mm(x, p.W_enc, obj.matmul_dtype) + p.b_enc  # (B_local, m_local)
        z, mask, n_active, min_selected = _dense_select(pre, p, obj, B, split)
        partial = _mm(z, p.W_dec, obj.matmul_dtype)  # (B_local, d)
        y_hat = _Summed.apply(partial, split.over_latents) + p.b_dec
        sq = (y_hat - y).pow(2).sum()
        l0 = _Summed.apply(n_active, split.over_all) / B
        if obj.architecture == "jumprelu" and obj.target_l0 is None:
            penalty = obj.coefficient * l0
        elif obj.architecture == "jumprelu":
            penalty = obj.coefficient * (l0 / obj.target_l0 - 1) ** 2
        elif obj.architecture == "relu":
            penalty = obj.coefficient * _Summed.apply(z.sum(), split.over_all) / B
        else:
            penalty = torch.zeros((), device=x.device)
        loss = sq / B + penalty
        aux = 0.0
        if obj.architecture in ("topk", "batchtopk") and obj.aux_k and _n_dead(dead, split):
            aux_loss, aux = _dense_aux_k(p, pre, (y - y_hat).detach(), dead, obj, B, split)
            loss = loss + aux_loss
        loss.backward()
    for q in p.parameters():
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    mse = float(split.over_rows(sq.detach().clone())) / B
    return StepStats(
        loss=mse + float(penalty.detach()) + aux,
        mse=mse,
        fvu=mse * B / max(centered_sq(y, split), 1e-12),
        l0=float(l0.detach()),
        fired=split.over_rows(mask.sum(0).to(p.W_enc.dtype)),
        min_selected=min_selected,
    )


def _dense_select(
    pre: Tensor, p: Params, obj: Objective, B: int, split: Split
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Latent values `z`, the active mask, the active count (differentiable for JumpReLU's L0 STE)
    and, for BatchTopK, the smallest positive selected value."""
    arch = obj.architecture
    min_selected = 0.0
    if arch == "jumprelu":
        z = JumpReLU.apply(pre, p.threshold, obj.bandwidth)
        mask = pre.detach() > p.threshold.detach()
        return z, mask, Step.apply(pre, p.threshold, obj.bandwidth).sum(), 0.0
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
    return z, mask, mask.sum().to(pre.dtype), min_selected


def _dense_aux_k(
    p: Params, pre: Tensor, residual: Tensor, dead: Tensor, obj: Objective, B: int, split: Split
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
