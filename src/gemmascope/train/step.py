"""One training step of an SAE or transcoder on the CPU, over blocks of latents.

The encoder runs block by block (`Objective.block` latents), so a wide SAE never holds its
`[batch, width]` pre-activations whole: pass 1 selects each block's active latents and decodes them,
keeping a sparse block's entries and dropping a dense one's (the first steps); pass 2 makes each
block's gradients (a dropped block is selected again) and hands them to a `Sink` at once, which
is Adam itself in training (`optim.RowAdam`), so no gradient of the whole dictionary exists either.
The math is `objectives`'; TopK and BatchTopK merge each row's best candidates across blocks (`topk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gemmascope.common.distributed import Partition
from gemmascope.train.objectives import (
    Objective,
    Params,
    StepStats,
    affine,
    aux_candidates,
    aux_k_loss,
    centered_sq,
    jump_penalty,
    min_selected_value,
    select_active,
    select_rule,
    window_grad,
)
from gemmascope.train.sparse import Active, DenseActive, Window, from_topk, select
from gemmascope.train.topk import ALONE, n_dead, stream_batch_topk, stream_topk


class Sink(Protocol):
    """Where a step's gradients go as they are made, one block of latents at a time."""

    rows_ok: bool
    """Whether it takes gradients for some rows of a block only (the others being zero)."""

    def latents(self, lo: int, hi: int, rows: Tensor | None, grads: dict[str, Tensor]) -> None:
        """Gradients of latents `lo..hi`: `W_dec`, `W_enc` as `[n, d]` per latent for the latents
        `rows` (all of `lo..hi` when None); `b_enc`, `threshold` as `[hi - lo]`."""

    def shared(self, grads: dict[str, Tensor]) -> None:
        """Gradients of the parameters every latent shares (`b_dec`, `W_skip`)."""


class GradWriter:
    """The `Sink` that writes each parameter's `.grad` at full size (ranks of a data-parallel run
    sum them before Adam; tests compare them)."""

    rows_ok = True

    def __init__(self, p: Params) -> None:
        self.p = p
        for q in p.parameters():  # a block writes only its rows: start from nothing
            q.grad = None

    def latents(self, lo: int, hi: int, rows: Tensor | None, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            q = getattr(self.p, name)
            whole = rows is None or g.dim() == 1
            if whole and lo == 0 and hi == q.shape[-1 if name == "W_enc" else 0]:
                q.grad = g.T if name == "W_enc" else g  # one block: no copy
                continue
            if q.grad is None:
                q.grad = (
                    torch.zeros(q.shape[::-1], dtype=q.dtype).T
                    if name == "W_enc"
                    else torch.zeros_like(q)
                )
            by_latent = q.grad.T if name == "W_enc" else q.grad  # (m, ...)
            if whole:
                by_latent[lo:hi] = g
            else:
                by_latent[rows] = g

    def shared(self, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            getattr(self.p, name).grad = g


def latent_blocks(m: int, block: int) -> list[tuple[int, int]]:
    """`(lo, hi)` of each block of `block` latents (one block of all `m` when `block` is 0)."""
    size = m if block <= 0 else block
    return [(lo, min(m, lo + size)) for lo in range(0, m, size)]


@dataclass
class _Part:
    """A block of latents between the selection and the gradients."""

    lo: int
    hi: int
    act: Active | DenseActive | None  # None: dense, selected again when its gradients are made
    window: Window | None = None
    aux: Active | None = None  # AuxK's dead latents of the block


def _clip(bounds: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:
    """Matryoshka group edges within latents `lo..hi`, relative to `lo` (groups may be empty)."""
    return tuple(min(max(b - lo, 0), hi - lo) for b in bounds)


@torch.no_grad()
def forward_backward(
    p: Params,
    x: Tensor,
    y: Tensor,
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
    sink: Sink | None = None,
) -> StepStats:
    """One step's loss and gradients for inputs `x [B, d]` and targets `y [B, d]`; the gradients
    go to `sink` block by block (default: each parameter's `.grad`).

    The encoder runs over blocks of `obj.block` latents, so no `[B, m]` matrix exists whole for a
    wide SAE: a sparse block keeps its active entries between the two passes, a dense one (the
    first steps) is computed again. With a `split`, this rank holds some rows of the batch (sum the
    gradients over ranks afterwards) or some latents (`p` is its slice, one block); losses and
    statistics are the whole batch's, and TopK/BatchTopK select over every rank's latents.
    """
    sink = GradWriter(p) if sink is None else sink
    B = int(split.over_rows(torch.tensor(x.shape[0])))  # rows of the whole batch
    (n, d), m, arch = x.shape, p.W_dec.shape[0], obj.architecture
    bounds = obj.bounds(m)
    # TopK/BatchTopK select across ranks over whole slices; JumpReLU/ReLU block any slice
    split_topk = (split.latents or split.rows) and arch in ("topk", "batchtopk")
    blocks = latent_blocks(m, 0 if split_topk else obj.block)

    def pre_of(lo: int, hi: int) -> Tensor:
        return affine(x, p.W_enc[:, lo:hi], p.b_enc[lo:hi], obj.matmul_dtype)  # (n, hi - lo)

    # 1. Select each block's active latents and decode them.
    dec = torch.zeros(
        len(bounds) - 1, n, d, dtype=p.W_dec.dtype
    )  # (G, n, d) decoding of each Matryoshka group
    fired, nnz, z_sum, kept, parts = torch.zeros(m, dtype=x.dtype), 0, 0.0, 0, []
    budget = n * (blocks[0][1] - blocks[0][0]) // 8  # active entries kept between the passes
    aux_act, min_selected = None, 0.0
    k_aux = min(obj.aux_k, n_dead(dead, split)) if arch in ("topk", "batchtopk") else 0
    if arch in ("jumprelu", "relu"):
        theta, half, max_density = select_rule(p.threshold, obj)
        for lo, hi in blocks:
            act, window = select(pre_of(lo, hi), theta[lo:hi], half, max_density)
            _decode_into(dec, act, p.W_dec[lo:hi], _clip(bounds, lo, hi))
            fired[lo:hi], nnz, z_sum = act.fired(), nnz + act.nnz, z_sum + float(act.val.sum())
            keep = len(blocks) == 1 or (isinstance(act, Active) and kept + act.nnz <= budget)
            kept += act.nnz if keep else 0
            parts.append(_Part(lo, hi, act, window) if keep else _Part(lo, hi, None))
    else:  # TopK/BatchTopK: selected over every block, then cut into blocks for the gradients
        if len(blocks) == 1:
            pre = pre_of(0, m)
            act, _, min_selected = select_active(pre, p.threshold, obj, B, split)
            aux_act = aux_candidates(pre, dead, k_aux, split) if k_aux else None
            del pre
        else:  # each row's best candidates (BatchTopK: the batch's), merged block by block
            if arch == "topk":
                (vals, cols), cand = stream_topk(blocks, pre_of, obj.k, dead, k_aux)
                act = from_topk(cols, vals.relu(), m)
            else:
                act, cand = stream_batch_topk(blocks, pre_of, obj.k * B, (n, m), dead, k_aux)
                min_selected = min_selected_value(act, split)
            aux_act = from_topk(cand[1], cand[0].relu(), m) if cand is not None else None
        _decode_into(dec, act, p.W_dec, bounds)
        fired, nnz = act.fired(), act.nnz
        for lo, hi in blocks:
            parts.append(_Part(lo, hi, act.columns(lo, hi) if len(blocks) > 1 else act))
            if aux_act is not None:
                parts[-1].aux = aux_act.columns(lo, hi) if len(blocks) > 1 else aux_act

    # 2. The error of every prefix's reconstruction.
    base = p.b_dec if p.W_skip is None else torch.addmm(p.b_dec, x, p.W_skip)  # (d,) or (n, d)
    y_hats = split.over_latents(dec) if dec.shape[0] == 1 else dec.cumsum_(0)
    errs = y_hats.add_(base).sub_(y)  # (G, n, d)
    sqs = [float(split.over_rows(e.pow(2).sum())) for e in errs]
    sq = sqs[-1]  # the whole dictionary's
    # dL/d(the decoding of group g): the prefixes from g on contain it, (G, n, d)
    gs = (errs if len(errs) == 1 else errs.flip(0).cumsum(0).flip(0)).mul(2.0 / B)
    fired = split.over_rows(fired)
    l0 = float(split.over_all(torch.tensor(float(nnz)))) / B
    penalty, aux, dpen_dl0, dpen_df = 0.0, 0.0, 0.0, None
    if arch == "relu":
        penalty = (
            obj.coefficient * float(split.over_all(torch.tensor(z_sum, dtype=torch.float64))) / B
        )
    elif arch == "jumprelu":
        penalty, dpen_dl0, dpen_df = jump_penalty(obj, l0, fired / B, split)
    if aux_act is not None:
        aux, g_aux = aux_k_loss(aux_act, p.W_dec, -errs[-1], obj, B, split)

    # 3. Gradients, block by block (dense blocks selected again).
    for part in parts:
        lo, hi, act, window = part.lo, part.hi, part.act, part.window
        if act is None:
            act, window = select(pre_of(lo, hi), *select_rule(p.threshold[lo:hi], obj))
        W_dec, bb, z = p.W_dec[lo:hi], _clip(bounds, lo, hi), act.val
        dz = act.sampled_groups(gs, W_dec, bb)  # dL/dz at the active entries
        thr = torch.zeros(hi - lo, dtype=p.threshold.dtype)
        if arch == "relu":
            dz = dz + obj.coefficient / B * (act.mask if isinstance(act, DenseActive) else 1.0)
        elif arch == "jumprelu":
            df = None if dpen_df is None else dpen_df[lo:hi]
            thr = window_grad(p.threshold[lo:hi], W_dec, gs, bb, window, obj.bandwidth,
                              dpen_dl0, df, B)  # fmt: skip
        elif isinstance(act, Active):
            dz = dz * (z > 0)
        rows = act.touched() if sink.rows_ok and isinstance(act, Active) else None
        rows = None if rows is None or 2 * len(rows) > hi - lo else rows
        g_dec = act.left_mul_t_groups(z, gs, bb, rows)  # (n_rows, d)
        g_enc = act.left_mul_t(dz, x, touched=rows)  # (n_rows, d)
        g_b = act.col_sum(dz)
        if part.aux is not None:  # AuxK's share: the dead latents it reconstructs with
            a = part.aux
            dz_aux = a.sampled(g_aux, W_dec.T) * (a.val > 0)
            rows, g_dec, g_enc = _add_rows(rows, (g_dec, g_enc), a, (a.val, dz_aux), (g_aux, x))
            g_b += a.col_sum(dz_aux)
        sink.latents(lo, hi, None if rows is None else rows + lo,
                     {"W_dec": g_dec, "W_enc": g_enc, "b_enc": g_b, "threshold": thr})  # fmt: skip
    shared = {"b_dec": gs[0].sum(0)}
    if p.W_skip is not None:
        shared["W_skip"] = x.T @ gs[0]  # (d, d)
    sink.shared(shared)
    var = centered_sq(y, split)
    return StepStats(loss=sum(sqs) / B + penalty + aux, mse=sq / B, fvu=sq / max(var, 1e-12),
                     l0=l0, fired=fired, min_selected=min_selected)  # fmt: skip


def _decode_into(dec: Tensor, act: Active | DenseActive, W_dec: Tensor, bounds: tuple[int, ...]):
    """Add the decoding of each group of `act`'s latents to `dec [G, n, d]`."""
    if dec.shape[0] == 1:
        dec[0] += act.decode(act.val, W_dec)
    else:
        dec += act.decode_groups(act.val, W_dec, bounds)


def _add_rows(rows: Tensor | None, grads: tuple[Tensor, Tensor], act: Active,
              values: tuple[Tensor, Tensor], dense: tuple[Tensor, Tensor]):  # fmt: skip
    """`grads` (for latents `rows`, or all when None) plus `act`'s `values^T @ dense` products,
    over the union of their latents."""
    extra_rows = act.touched()
    extra = [act.left_mul_t(v, t, touched=extra_rows) for v, t in zip(values, dense, strict=True)]
    if rows is None:
        return None, *(g.index_add_(0, extra_rows, e) for g, e in zip(grads, extra, strict=True))
    union = torch.cat([rows, extra_rows]).unique()  # sorted
    out = []
    for g, e in zip(grads, extra, strict=True):
        total = torch.zeros(len(union), g.shape[1], dtype=g.dtype)
        total.index_add_(0, torch.searchsorted(union, rows), g)
        out.append(total.index_add_(0, torch.searchsorted(union, extra_rows), e))
    return union, *out
