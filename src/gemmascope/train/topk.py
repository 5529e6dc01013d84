"""TopK and BatchTopK selection: over a whole `[B, m]` pre-activation matrix, or streamed over
blocks of latents so that a wide SAE's matrix never exists whole (`stream_topk`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gemmascope.common.distributed import Partition
from gemmascope.train.sparse import Active, from_topk

ALONE = Partition()


def n_dead(dead: Tensor | None, split: Partition) -> int:
    """Dead latents over every rank's slice (all ranks agree, so they take the same branches)."""
    if dead is None:
        return 0
    return int(split.over_latents(dead.sum()))


def row_topk(pre: Tensor, k: int, split: Partition = ALONE) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per row, the `k` largest of `pre [B, m]` over the latents of every rank.

    Returns `(vals, cols, won)`, each `[B, min(k, m)]`: this rank's candidates, their columns, and
    which of them are in the row's global top k (None when the latents are not split: all are).
    """
    vals, cols = pre.topk(min(k, pre.shape[1]), dim=1, sorted=False)
    if not split.latents:
        return vals, cols, None
    import torch.distributed as dist

    c = vals.shape[1]
    padded = torch.full((pre.shape[0], k), float("-inf"), dtype=pre.dtype, device=pre.device)
    padded[:, :c] = vals.detach()
    everyone = split.gather(padded, 1)  # (B, world * k), rank r in columns [r k, r k + k)
    pos = everyone.topk(min(k, everyone.shape[1]), dim=1, sorted=False).indices
    won = torch.zeros_like(everyone, dtype=torch.bool).scatter_(1, pos, True)
    r = dist.get_rank()
    return vals, cols, won[:, r * k : r * k + c]


def topk_active(pre: Tensor, k: int, split: Partition) -> Active:
    vals, cols, won = row_topk(pre, k, split)
    if won is None:
        return from_topk(cols, vals.relu(), pre.shape[1])
    rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(cols)
    return from_entries(rows[won], cols[won], vals[won].relu(), pre.shape)


def batch_threshold(pre: Tensor, n: int, k: int, split: Partition = ALONE) -> Tensor:
    """The `n`-th largest entry of the whole batch's `pre` (over every rank's rows and latents).

    Each row offers its top `4k` candidates first; the n-th largest of candidates is at most the
    true one, and equal to it exactly when no more than `n` entries reach it. Otherwise every entry
    is a candidate.
    """
    cand = pre.topk(min(pre.shape[1], 4 * k), dim=1, sorted=False).values.reshape(-1)
    for pool in (cand, pre.reshape(-1)):
        local = pool.topk(min(n, pool.numel()), sorted=False).values
        everyone = split.gather(local.detach(), 0)
        v = everyone.topk(min(n, everyone.numel()), sorted=False).values.min()
        if int(split.over_all((pre >= v).sum())) <= n:
            break
    return v


def batch_topk_active(pre: Tensor, n: int, k: int, split: Partition) -> Active:
    """The `n = k * B` largest relu'd pre-activations of the whole batch, as entries of this rank."""
    keep = pre >= batch_threshold(pre, n, k, split)  # (B, m)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: CSR order
    return from_entries(rows, cols, pre[rows, cols].relu(), pre.shape)


def from_entries(rows: Tensor, cols: Tensor, vals: Tensor, shape: Sequence[int]) -> Active:
    """`Active` from entries in any order."""
    B, m = shape
    order = torch.argsort(rows * m + cols)
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(B + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return Active(crow, cols.contiguous(), vals.contiguous(), m)


Candidates = tuple[Tensor, Tensor]
"""Per row, the largest pre-activations seen so far and their latents: `([B, c], [B, c])`."""


def _merge(best: Candidates | None, vals: Tensor, cols: Tensor, c: int) -> Candidates:
    if best is not None:
        vals, cols = torch.cat([best[0], vals], 1), torch.cat([best[1], cols], 1)
    top = vals.topk(min(c, vals.shape[1]), dim=1, sorted=False)
    return top.values, cols.gather(1, top.indices)


def _merge_dead(best: Candidates | None, pre: Tensor, lo: int, dead: Tensor | None,
                c: int) -> Candidates | None:  # fmt: skip
    """`best` merged with each row's `c` largest of `pre [B, hi - lo]` among the dead latents of
    the block starting at `lo` (AuxK's candidates)."""
    if not c or dead is None or not bool(dead[lo : lo + pre.shape[1]].any()):
        return best
    idx = dead[lo : lo + pre.shape[1]].nonzero().squeeze(1)
    vals, cols = pre[:, idx].topk(min(c, len(idx)), dim=1, sorted=False)
    return _merge(best, vals, idx[cols] + lo, c)


def stream_topk(
    blocks: Sequence[tuple[int, int]],
    pre_of: Callable[[int, int], Tensor],
    c: int,
    dead: Tensor | None = None,
    c_dead: int = 0,
) -> tuple[Candidates, Candidates | None]:
    """Each row's `c` largest pre-activations over every block of latents (`pre_of(lo, hi)` gives
    `[B, hi - lo]`), and its `c_dead` largest among the `dead` latents (for AuxK), holding one
    block's matrix at a time."""
    best = best_dead = None
    for lo, hi in blocks:
        pre = pre_of(lo, hi)  # (B, hi - lo)
        vals, cols = pre.topk(min(c, hi - lo), dim=1, sorted=False)
        best = _merge(best, vals, cols + lo, c)
        best_dead = _merge_dead(best_dead, pre, lo, dead, c_dead)
        del pre
    assert best is not None
    return best, best_dead


def stream_batch_topk(
    blocks: Sequence[tuple[int, int]],
    pre_of: Callable[[int, int], Tensor],
    n: int,
    shape: tuple[int, int],
    dead: Tensor | None = None,
    c_dead: int = 0,
) -> tuple[Active, Candidates | None]:
    """BatchTopK's `n` largest entries of the whole batch, streamed over blocks of latents (and
    each row's `c_dead` largest among the `dead` latents, for AuxK).

    The `n` best so far set a bar that only rises, so each later block offers just its entries
    above it: memory stays O(n) beyond one block's matrix.
    """
    best: tuple[Tensor, Tensor, Tensor] | None = None  # values, rows, columns of the n best
    best_dead = None
    for lo, hi in blocks:
        pre = pre_of(lo, hi)  # (B, hi - lo)
        if best is None or len(best[0]) < n:
            vals, flat = pre.reshape(-1).topk(min(n, pre.numel()), sorted=False)
            rows, cols = flat // (hi - lo), flat % (hi - lo)
        else:
            rows, cols = (pre > best[0].min()).nonzero(as_tuple=True)
            vals = pre[rows, cols]
        cols = cols + lo
        if best is not None:
            vals, rows, cols = (torch.cat(ab) for ab in zip(best, (vals, rows, cols), strict=True))
        top = vals.topk(min(n, len(vals)), sorted=False).indices
        best = vals[top], rows[top], cols[top]
        best_dead = _merge_dead(best_dead, pre, lo, dead, c_dead)
        del pre
    assert best is not None
    vals, rows, cols = best
    return from_entries(rows, cols, vals.relu(), shape), best_dead
