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
    if q.grad is None:
        raise ValueError("adam_step: the parameter has no gradient; run the backward pass first")
    adam_apply(q.data, q.grad, v, m, lr=lr, beta1=beta1, beta2=beta2, step=step,
               unit_rows=unit_rows, col_scale=col_scale)  # fmt: skip
    q.grad = None


def adam_apply(
    w: Tensor,
    g: Tensor,
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
    """`adam_step` on a tensor `w` (or a view of a parameter's) and its gradient `g`."""
    if beta1 > 0 and m is None:
        raise ValueError("adam_step: beta1 > 0 needs the first-moment state `m`")
    bc1, bc2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
    # unit rows must be rows of memory; plain Adam is element-wise, so a transposed layout will do
    rows = _row_views(w, g, v, m if m is not None else v, transposed=not unit_rows)
    if rows is not None and (col_scale is None or unit_rows):
        cols = torch.ones(rows[0].shape[1]) if col_scale is None else col_scale.float().cpu()
        _adam_rows(*rows, lr, beta1, beta2, bc1, bc2, unit_rows, cols.numpy())
        return
    if unit_rows:
        g = g - (g * w).sum(1, keepdim=True) * w
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if m is not None and beta1 > 0:
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        g = m / bc1
    step_dir = g if col_scale is None else g * col_scale.to(g.device)
    w.addcdiv_(step_dir, (v / bc2).sqrt_().add_(_EPS), value=-lr)
    if unit_rows:
        w /= w.norm(dim=1, keepdim=True)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _adam_rows_at(
    w, g, idx, v, mom, last, step, lr, beta1, beta2, bc1, bc2, unit_rows
):  # pragma: no cover
    """Adam on rows `idx[j]` (distinct: rows run in parallel) of `w` from `g[j]`, each row's `v`
    first decayed over the steps since `last` (the steps it was not touched: exact when beta1 = 0,
    as a zero gradient then moves nothing)."""
    n, d = g.shape
    use_m = beta1 > 0.0
    for j in numba.prange(n):
        i = idx[j]
        decay = beta2 ** (step - last[i] + 1)
        dot = 0.0
        if unit_rows:
            for k in range(d):
                dot += g[j, k] * w[i, k]
        sq = 0.0
        for k in range(d):
            gk = g[j, k] - dot * w[i, k]
            vk = decay * v[i, k] + (1.0 - beta2) * gk * gk
            v[i, k] = vk
            if use_m:
                mk = beta1 * mom[i, k] + (1.0 - beta1) * gk
                mom[i, k] = mk
                gk = mk / bc1
            wk = w[i, k] - lr * gk / (math.sqrt(vk / bc2) + _EPS)
            w[i, k] = wk
            sq += wk * wk
        if unit_rows:
            s = 1.0 / math.sqrt(sq)
            for k in range(d):
                w[i, k] *= s


def by_latent(name: str, t: Tensor) -> Tensor:
    """A latent-indexed parameter (or its state) with latents first: `W_enc (d, m)` as `(m, d)`."""
    return t.T if name.split(".")[0] == "W_enc" else t


class RowAdam:
    """The trainer's `objectives.Sink` on the CPU: Adam applied to each block of latents as soon
    as its gradients exist, so a step never holds gradients of the whole dictionary, and only to
    the rows a step touched. Untouched rows stay as they are; their second moment is decayed for
    the steps they missed when next touched (`last`), which equals dense Adam when beta1 = 0 (a
    zero gradient then moves nothing). With beta1 > 0 every row is stepped."""

    def __init__(self, params: torch.nn.Module, state: dict[str, Tensor], last: Tensor, *,
                 lr: float, threshold_lr: float, beta1: float, beta2: float, step: int) -> None:  # fmt: skip
        self.params, self.state, self.last = dict(params.named_parameters()), state, last
        self.lr, self.threshold_lr, self.beta1, self.beta2, self.step = (
            lr, threshold_lr, beta1, beta2, step)  # fmt: skip
        self.rows_ok = beta1 == 0

    def _moments(self, name: str) -> tuple[Tensor, Tensor | None]:
        if self.beta1 > 0 and f"{name}.m" not in self.state:
            self.state[f"{name}.m"] = torch.zeros_like(self.params[name])
        return self.state[name], self.state.get(f"{name}.m") if self.beta1 > 0 else None

    def latents(self, lo: int, hi: int, rows: Tensor | None, grads: dict[str, Tensor]) -> None:
        idx = torch.arange(lo, hi) if rows is None else rows
        step, b1, b2 = self.step, self.beta1, self.beta2
        for name in ("W_dec", "W_enc"):
            v, m = self._moments(name)
            views = [by_latent(name, t) for t in (self.params[name].data, v, v if m is None else m)]
            if not all(t.is_contiguous() for t in views):
                raise RuntimeError(f"{name}: expected rows of memory per latent (see state.place)")
            _adam_rows_at(views[0].numpy(), grads[name].contiguous().numpy(), idx.numpy(),
                          views[1].numpy(), views[2].numpy(), self.last.numpy(), step, self.lr,
                          b1, b2, 1 - b1 ** (step + 1), 1 - b2 ** (step + 1),
                          name == "W_dec")  # fmt: skip
        self.last[idx] = step + 1
        for name in ("b_enc", "threshold"):
            v, m = self._moments(name)
            w = self.params[name].data[lo:hi]
            lr = self.lr * (self.threshold_lr if name == "threshold" else 1.0)
            adam_apply(w, grads[name], v[lo:hi], None if m is None else m[lo:hi], lr=lr,
                       beta1=b1, beta2=b2, step=step)  # fmt: skip
            if name == "threshold":
                w.clamp_(min=0.0)

    def shared(self, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            v, m = self._moments(name)
            adam_apply(self.params[name].data, g, v, m, lr=self.lr, beta1=self.beta1,
                       beta2=self.beta2, step=self.step)  # fmt: skip


def catch_up(v: dict[str, Tensor], last: Tensor, beta2: float, step: int) -> None:
    """Decay the second moment of the latents' rows that `RowAdam` left behind, up to `step`
    (before a dense step, which decays every row)."""
    stale = (last < step).nonzero().squeeze(1)
    if len(stale):
        decay = beta2 ** (step - last[stale]).double()  # (n_stale,)
        for name in ("W_dec", "W_enc"):
            rows = by_latent(name, v[name])
            rows[stale] *= decay.to(rows.dtype).unsqueeze(1)
    last.fill_(step)


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
