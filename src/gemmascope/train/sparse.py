"""Sparse building blocks for training: pick the active latents in one pass, then touch only those.

An SAE step is dense in one place only, the encoder matmul `x @ W_enc`. Everything after it (decoding,
the decoder and encoder gradients, the threshold gradient) involves only the ~L0 active latents per
token and the few that sit within the STE bandwidth of their threshold. `Active` holds those positions
as a CSR matrix and its transpose, which is what the torch sparse kernels want.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numba
import numpy as np
import torch
from torch import Tensor


@numba.njit(parallel=True, cache=True)
def _count(pre, theta, lo, hi):  # pragma: no cover - compiled
    n, m = pre.shape
    n_active = np.zeros(n, np.int64)
    n_window = np.zeros(n, np.int64)
    for r in numba.prange(n):
        a = 0
        w = 0
        for c in range(m):
            p = pre[r, c]
            if p > theta[c]:
                a += 1
            if lo[c] < p < hi[c]:
                w += 1
        n_active[r] = a
        n_window[r] = w
    return n_active, n_window


@numba.njit(parallel=True, cache=True)
def _fill(pre, theta, lo, hi, crow, wrow, col, val, wrows, wcols, wvals):  # pragma: no cover
    n, m = pre.shape
    for r in numba.prange(n):
        a = crow[r]
        w = wrow[r]
        for c in range(m):
            p = pre[r, c]
            if p > theta[c]:
                col[a] = c
                val[a] = p
                a += 1
            if lo[c] < p < hi[c]:
                wrows[w] = r
                wcols[w] = c
                wvals[w] = p
                w += 1


@dataclass
class Window:
    """Positions whose pre-activation lies within half a bandwidth of the threshold."""

    rows: Tensor  # (n_window,)
    cols: Tensor  # (n_window,)
    pre: Tensor  # (n_window,)


def select(
    pre: Tensor, theta: Tensor, half_width: float, max_density: float = 0.02
) -> tuple[Active | DenseActive, Window]:
    """Entries of `pre [B, m]` above `theta [m]`, and the STE window around `theta`.

    Counts first (one pass), then fills a CSR `Active` when the density is at most `max_density`,
    else a `DenseActive` mask, because sparse kernels lose to dense ones on dense patterns.
    """
    p = pre.detach().contiguous().numpy()
    t = theta.detach().to(pre.dtype).contiguous().numpy()
    if half_width > 0:
        lo, hi = t - half_width, t + half_width
    else:  # an empty interval: lo > hi
        lo, hi = np.full_like(t, np.inf), np.full_like(t, -np.inf)
    n_active, n_window = _count(p, t, lo, hi)
    n, m = p.shape
    crow = np.zeros(n + 1, np.int64)
    np.cumsum(n_active, out=crow[1:])
    wrow = np.zeros(n + 1, np.int64)
    np.cumsum(n_window, out=wrow[1:])
    dense = crow[-1] > max_density * n * m
    nnz = 0 if dense else crow[-1]
    col, val = np.empty(nnz, np.int64), np.empty(nnz, p.dtype)
    wr, wc = np.empty(wrow[-1], np.int64), np.empty(wrow[-1], np.int64)
    wv = np.empty(wrow[-1], p.dtype)
    if dense:  # only the window is filled; the active pattern stays a dense mask
        _fill(
            p,
            np.full_like(t, np.inf),
            lo,
            hi,
            np.zeros(n + 1, np.int64),
            wrow,
            col,
            val,
            wr,
            wc,
            wv,
        )
    else:
        _fill(p, t, lo, hi, crow, wrow, col, val, wr, wc, wv)
    window = Window(torch.from_numpy(wr), torch.from_numpy(wc), torch.from_numpy(wv))
    if dense:
        return DenseActive(pre * (pre > theta)), window
    return Active(torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(val), m), window


@numba.njit(cache=True)
def _transpose(crow, col, m):  # pragma: no cover - compiled
    """Counting sort of CSR entries by column: the transpose's row pointers, its columns, and the order."""
    n = len(crow) - 1
    nnz = len(col)
    crow_t = np.zeros(m + 1, np.int64)
    for j in range(nnz):
        crow_t[col[j] + 1] += 1
    for c in range(m):
        crow_t[c + 1] += crow_t[c]
    nxt = crow_t[:-1].copy()
    rows_t = np.empty(nnz, np.int64)
    order = np.empty(nnz, np.int64)
    for r in range(n):
        for j in range(crow[r], crow[r + 1]):
            c = col[j]
            k = nxt[c]
            rows_t[k] = r
            order[k] = j
            nxt[c] = k + 1
    return crow_t, rows_t, order


@numba.njit(parallel=True, fastmath=True, cache=True)
def _spmm(crow, idx, val, order, dense, out):  # pragma: no cover - compiled
    """out[i] = sum_j val[order[j]] * dense[idx[j]] over j in row i (order = -1 means identity)."""
    n = len(crow) - 1
    d = dense.shape[1]
    for i in numba.prange(n):
        for k in range(d):
            out[i, k] = 0.0
        for j in range(crow[i], crow[i + 1]):
            v = val[j] if order[0] < 0 else val[order[j]]
            r = idx[j]
            for k in range(d):
                out[i, k] += v * dense[r, k]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _spmm_groups(crow, idx, val, group, dense, out):  # pragma: no cover - compiled
    """out[group[c], i] = sum_j val[j] * dense[c] over the entries j of row i, c = idx[j]."""
    n = len(crow) - 1
    d = dense.shape[1]
    for i in numba.prange(n):
        for g in range(out.shape[0]):
            for k in range(d):
                out[g, i, k] = 0.0
        for j in range(crow[i], crow[i + 1]):
            v = val[j]
            c = idx[j]
            g = group[c]
            for k in range(d):
                out[g, i, k] += v * dense[c, k]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _pair_dots(rows, cols, a, b, out):  # pragma: no cover - compiled
    """out[j] = a[rows[j]] . b[cols[j]]."""
    d = a.shape[1]
    for j in numba.prange(len(rows)):
        r, c = rows[j], cols[j]
        acc = 0.0
        for k in range(d):
            acc += a[r, k] * b[c, k]
        out[j] = acc


_IDENTITY = np.full(1, -1, np.int64)


def pair_dots(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """`(a[rows] * b[cols]).sum(-1)` without materialising the gathered rows."""
    out = np.empty(rows.numel(), np.float64 if a.dtype == torch.float64 else np.float32)
    if rows.numel():
        _pair_dots(
            rows.numpy(),
            cols.numpy(),
            a.detach().contiguous().numpy(),
            b.detach().contiguous().numpy(),
            out,
        )
    return torch.from_numpy(out)


class Active:
    """The active latents of a batch: a CSR pattern `[B, m]` with values, and its transpose.

    Products with the pattern run in compiled loops over the active entries only.
    """

    def __init__(self, crow: Tensor, col: Tensor, val: Tensor, n_latents: int) -> None:
        self.n, self.m = crow.numel() - 1, n_latents
        self.crow, self.cols, self.val = crow, col, val
        crow_t, rows_t, order = _transpose(crow.numpy(), col.numpy(), n_latents)
        self.crow_t, self.rows_t, self.order = map(torch.from_numpy, (crow_t, rows_t, order))
        self.rows = torch.repeat_interleave(torch.arange(self.n), crow.diff())

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def columns(self, lo: int, hi: int) -> Active:
        """The entries of latents `lo..hi`, as an `Active` over those latents alone."""
        keep = (self.cols >= lo) & (self.cols < hi)
        crow = torch.zeros(self.n + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(self.rows[keep], minlength=self.n).cumsum(0)
        return Active(crow, self.cols[keep] - lo, self.val[keep], hi - lo)

    def touched(self) -> Tensor:
        """The latents with at least one active entry, ascending: the rows of `W_dec` and `W_enc`
        whose gradient is not zero."""
        return self.crow_t.diff().nonzero().squeeze(1)

    def _spmm(
        self,
        transpose: bool,
        values: Tensor,
        dense: Tensor,
        cols: tuple[int, int] | None = None,
        touched: Tensor | None = None,
    ) -> Tensor:
        dense = dense.detach().contiguous()
        crow, idx, order = (
            (self.crow_t, self.rows_t, self.order) if transpose else (self.crow, self.cols, None)
        )
        if touched is not None:  # the nonempty rows of the transpose (within lo..hi) only
            hi = self.m if cols is None else cols[1]
            crow = torch.cat([crow[touched], crow[hi : hi + 1]])
        elif cols is not None:  # latents lo..hi only: rows lo..hi of the transpose
            crow = crow[cols[0] : cols[1] + 1]
        out = torch.empty(crow.numel() - 1, dense.shape[1], dtype=dense.dtype)
        if self.nnz:
            _spmm(
                crow.numpy(),
                idx.numpy(),
                values.detach().contiguous().numpy(),
                _IDENTITY if order is None else order.numpy(),
                dense.numpy(),
                out.numpy(),
            )
        else:
            out.zero_()
        return out

    def decode(self, values: Tensor, W_dec: Tensor) -> Tensor:
        """`Z @ W_dec` for the sparse `Z` with `values`: `[B, d]`."""
        return self._spmm(False, values, W_dec)

    def decode_groups(self, values: Tensor, W_dec: Tensor, bounds: tuple[int, ...]) -> Tensor:
        """`Z[:, lo:hi] @ W_dec[lo:hi]` for each group of latents `bounds[g]..bounds[g + 1]`:
        `[G, B, d]`, in one pass over the active entries."""
        out = torch.empty(len(bounds) - 1, self.n, W_dec.shape[1], dtype=W_dec.dtype)
        if not self.nnz:
            return out.zero_()
        _spmm_groups(self.crow.numpy(), self.cols.numpy(), values.detach().contiguous().numpy(),
                     group_of(bounds).numpy(), W_dec.detach().contiguous().numpy(), out.numpy())  # fmt: skip
        return out

    def left_mul_t(
        self,
        values: Tensor,
        dense: Tensor,
        cols: tuple[int, int] | None = None,
        touched: Tensor | None = None,
    ) -> Tensor:
        """`Z^T @ dense` for the sparse `Z [B, m]` and `dense [B, k]`: `[m, k]` (rows `lo..hi`
        only, `[hi - lo, k]`, for `cols=(lo, hi)`; only the rows `touched` (from `touched()`,
        within `cols`), `[len(touched), k]`, when given)."""
        return self._spmm(True, values, dense, cols, touched)

    def sampled(self, a: Tensor, b: Tensor, rows: Tensor | None = None) -> Tensor:
        """`(a @ b)[rows, cols]` computed only at the active positions; `a [B, k]`, `b [k, m]`.
        `rows` replaces each entry's row of `a` (a stack of several `[B, k]`, say)."""
        return pair_dots(self.rows if rows is None else rows, self.cols, a, b.T)

    def sampled_groups(self, gs: Tensor, W_dec: Tensor, bounds: tuple[int, ...]) -> Tensor:
        """At each active entry `(r, c)`, `gs[group of c, r] . W_dec[c]`; `gs [G, B, d]`."""
        if gs.shape[0] == 1:
            return self.sampled(gs[0], W_dec.T)
        rows = group_of(bounds)[self.cols] * self.n + self.rows
        return self.sampled(gs.reshape(-1, gs.shape[-1]), W_dec.T, rows)

    def left_mul_t_groups(
        self, values: Tensor, gs: Tensor, bounds: tuple[int, ...], touched: Tensor | None = None
    ) -> Tensor:
        """Rows `lo..hi` of `Z^T @ gs[g]` for each group `g` of latents: `[m, d]` (the rows
        `touched` only, when given)."""
        if gs.shape[0] == 1:
            return self.left_mul_t(values, gs[0], touched=touched)
        parts = []
        for g, (lo, hi) in enumerate(pairwise(bounds)):
            rows = None if touched is None else touched[(touched >= lo) & (touched < hi)]
            parts.append(self.left_mul_t(values, gs[g], (lo, hi), rows))
        return torch.cat(parts)

    def col_sum(self, values: Tensor) -> Tensor:
        """Sum of `values` per latent: `[m]`."""
        return torch.zeros(self.m, dtype=values.dtype).index_add_(0, self.cols, values)

    def fired(self) -> Tensor:
        """How many tokens each latent fired on: `[m]`."""
        return self.crow_t.diff().to(self.val.dtype)


def group_of(bounds: tuple[int, ...]) -> Tensor:
    """`[m]`: the group of each latent, for groups `bounds[g]..bounds[g + 1]`."""
    return torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())


def from_topk(indices: Tensor, values: Tensor, n_latents: int) -> Active:
    """`Active` from per-row top-k indices and values `[B, k]`; columns are sorted as CSR wants."""
    n, k = indices.shape
    indices, perm = indices.sort(dim=-1)
    values = values.gather(-1, perm)
    crow = torch.arange(0, (n + 1) * k, k, dtype=torch.int64)
    return Active(crow, indices.reshape(-1).long(), values.reshape(-1).contiguous(), n_latents)


class DenseActive:
    """The same interface as `Active` over a dense `[B, m]` tensor of values (zero where inactive)."""

    def __init__(self, z: Tensor) -> None:
        self.val = z
        self.mask = (z != 0).to(z.dtype)
        self.n, self.m = z.shape

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def decode(self, values: Tensor, W_dec: Tensor) -> Tensor:
        return values @ W_dec

    def decode_groups(self, values: Tensor, W_dec: Tensor, bounds: tuple[int, ...]) -> Tensor:
        return torch.stack([values[:, lo:hi] @ W_dec[lo:hi] for lo, hi in pairwise(bounds)])

    def left_mul_t(
        self,
        values: Tensor,
        dense: Tensor,
        cols: tuple[int, int] | None = None,
        touched: None = None,
    ) -> Tensor:
        return (values if cols is None else values[:, cols[0] : cols[1]]).T @ dense

    def sampled(self, a: Tensor, b: Tensor) -> Tensor:
        return (a @ b) * self.mask

    def sampled_groups(self, gs: Tensor, W_dec: Tensor, bounds: tuple[int, ...]) -> Tensor:
        parts = [gs[g] @ W_dec[lo:hi].T for g, (lo, hi) in enumerate(pairwise(bounds))]
        return torch.cat(parts, 1) * self.mask

    def left_mul_t_groups(
        self, values: Tensor, gs: Tensor, bounds: tuple[int, ...], touched: None = None
    ) -> Tensor:
        return torch.cat(
            [self.left_mul_t(values, gs[g], c) for g, c in enumerate(pairwise(bounds))]
        )

    def col_sum(self, values: Tensor) -> Tensor:
        return values.sum(0)

    def fired(self) -> Tensor:
        return self.mask.sum(0)
