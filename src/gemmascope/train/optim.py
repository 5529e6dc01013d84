"""Adam for SAE parameters, with the recipe's unit-norm decoder rows, in one pass over memory.

A sparse SAE step leaves the optimiser as its biggest cost after the encoder matmul: written as torch
ops, Adam, the projection of each decoder row's gradient and the renormalisation of the rows take
about a dozen passes over width x d_in tensors. On the CPU one numba kernel does all of it per row
while the row is in cache; on other devices the same arithmetic runs as torch ops.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import torch
from torch import Tensor

_EPS = 1e-8


@numba.njit(parallel=True, fastmath=True, cache=True)
def _adam_rows(w, g, v, mom, lr, beta1, beta2, bc1, bc2, unit_rows, cols):  # pragma: no cover
    """One Adam step on each row of `w` (2-D), projecting and renormalising rows if `unit_rows`;
    column j's step is scaled by `cols[j]`."""
    n, d = w.shape
    use_m = beta1 > 0.0
    for i in numba.prange(n):
        dot = 0.0
        if unit_rows:
            for j in range(d):
                dot += g[i, j] * w[i, j]
        sq = 0.0
        for j in range(d):
            gj = g[i, j] - dot * w[i, j]
            vj = beta2 * v[i, j] + (1.0 - beta2) * gj * gj
            v[i, j] = vj
            if use_m:
                mj = beta1 * mom[i, j] + (1.0 - beta1) * gj
                mom[i, j] = mj
                gj = mj / bc1
            wj = w[i, j] - lr * cols[j] * gj / (math.sqrt(vj / bc2) + _EPS)
            w[i, j] = wj
            sq += wj * wj
        if unit_rows:
            s = 1.0 / math.sqrt(sq)
            for j in range(d):
                w[i, j] *= s


def adam_step(
    q: Tensor,
    v: Tensor,
    m: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    step: int,
    unit_rows: bool = False,
    col_scale: Tensor | None = None,
) -> None:
    """One in-place Adam step on `q` from `q.grad` (then cleared); `v`, `m`: its moment estimates.

    With `unit_rows` (decoder weights, one latent per row), the gradient component along each row is
    removed first and each row is put back on the unit sphere after the step, as Gemma Scope does.
    `m` is only read when `beta1 > 0` (the recipe's beta1 is 0). `col_scale [q.shape[1]]` scales
    the step of each column of a 2-D `q` (a CLT's decoder blocks).
    """
    g = q.grad
    if g is None:
        raise ValueError("adam_step: the parameter has no gradient; run the backward pass first")
    if beta1 > 0 and m is None:
        raise ValueError("adam_step: beta1 > 0 needs the first-moment state `m`")
    bc1, bc2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
    # unit rows must be rows of memory; plain Adam is element-wise, so a transposed layout will do
    rows = _row_views(q.data, g, v, m if m is not None else v, transposed=not unit_rows)
    if rows is not None and (col_scale is None or unit_rows):
        cols = torch.ones(rows[0].shape[1]) if col_scale is None else col_scale.float().cpu()
        _adam_rows(*rows, lr, beta1, beta2, bc1, bc2, unit_rows, cols.numpy())
    else:
        if unit_rows:
            g = g - (g * q.data).sum(1, keepdim=True) * q.data
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if m is not None and beta1 > 0:
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            g = m / bc1
        step_dir = g if col_scale is None else g * col_scale.to(g.device)
        q.data.addcdiv_(step_dir, (v / bc2).sqrt_().add_(_EPS), value=-lr)
        if unit_rows:
            q.data /= q.data.norm(dim=1, keepdim=True)
    q.grad = None


def _row_views(*ts: Tensor, transposed: bool) -> list[Any] | None:
    """Row-major numpy views of same-shaped CPU float32 tensors sharing one layout (with
    `transposed`, also the transpose of a row-major array); None otherwise (torch ops then run).

    W_enc is kept (and its gradient made) as the transpose of a row-major (width, d_in) array,
    because the sparse kernels write it one latent at a time."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in ts):
        return None
    if all(t.is_contiguous() for t in ts):
        return [_as_rows(t).numpy() for t in ts]
    if transposed and all(t.dim() == 2 and t.T.is_contiguous() for t in ts):
        return [t.T.numpy() for t in ts]
    return None


def _as_rows(t: Tensor) -> Tensor:
    return t.view(1, -1) if t.dim() < 2 else t.view(t.shape[0], -1)
