"""Losses and their gradients for each architecture, computed sparsely by hand.

JumpReLU follows Gemma Scope (arXiv 2408.05147, §2.2) and "Jumping Ahead" (arXiv 2407.14435):
loss = ||y - y_hat||^2 + lambda * L0, with straight-through estimators for the threshold using a
rectangle kernel of bandwidth eps:
    d JumpReLU(p; t) / dt = -(t / eps) * K((p - t) / eps)
    d H(p - t) / dt       = -(1 / eps) * K((p - t) / eps),   K(u) = 1[|u| < 1/2]
The threshold is trained directly (not as exp(log_t)), clamped at 0 after each step, as SAELens 6 does:
in log space Adam moves it by a factor ~(1 + lr) per step, so from its 0.001 start a short run never
reaches the ~0.1 thresholds that L0 ~ 50 needs.
`dense.dense_loss` is the same objective through autograd; tests check one against the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemmascope.common.distributed import Partition
from gemmascope.train.sparse import (
    Active,
    DenseActive,
    Window,
    from_topk,
    group_of,
    pair_dots,
    select,
)

ALONE = Partition()


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
    prefixes: tuple[int, ...] = ()
    """Matryoshka: widths of the nested prefixes of the dictionary that each reconstruct the input too."""
    frequency_coefficient: float = 0.0
    """JumpReLU: weight of the penalty sum_j max(0, f_j / max_frequency - 1)^2 on latents firing on
    a share f_j of the tokens above `max_frequency`."""
    max_frequency: float = 0.1

    def bounds(self, width: int) -> tuple[int, ...]:
        """Edges of the groups of latents: prefix `i` is latents `0..bounds[i + 1]`."""
        return (0, *self.prefixes, width)

    def frequency_penalty(self, freq: Tensor) -> tuple[float, Tensor]:
        """The penalty on high-frequency latents at firing shares `freq [m]`, and its gradient."""
        over = (freq / self.max_frequency - 1.0).clamp_(min=0.0)
        c = self.frequency_coefficient
        return c * float(over.pow(2).sum()), over.mul_(2 * c / self.max_frequency)

    def l0_penalty(self, l0: float | Tensor) -> float | Tensor:
        """JumpReLU's sparsity penalty at mean L0 `l0` (a float, or a tensor for autograd)."""
        if self.target_l0 is None:
            return self.coefficient * l0
        return self.coefficient * (l0 / self.target_l0 - 1.0) ** 2

    def l0_penalty_grad(self, l0: float) -> float:
        """d `l0_penalty` / d L0 at `l0`."""
        if self.target_l0 is None:
            return self.coefficient
        return 2 * self.coefficient * (l0 / self.target_l0 - 1.0) / self.target_l0


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

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        threshold: float,
        generator: torch.Generator,
        encoder_scale: float = 1.0,
        skip: bool = False,
    ) -> None:
        super().__init__()
        # W_dec He-uniform, each latent's row rescaled to unit norm; W_enc its transpose (times
        # `encoder_scale`, 1 in the recipe); biases zero.
        w = torch.empty(d_sae, d_in)
        bound = (6.0 / d_in) ** 0.5
        w.uniform_(-bound, bound, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        # W_enc is (d_in, d_sae) stored one latent per row of memory, as the sparse kernels write its
        # gradient; keep that layout (`train.place` does) so Adam runs in one pass (`optim`).
        self.W_enc = nn.Parameter(w.T * encoder_scale)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.full((d_sae,), float(threshold)))
        # A skip transcoder's linear part starts at zero, as sparsify's does: the latents begin alone.
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in)) if skip else None


def encoder_pre(x: Tensor, p: Params, dtype: torch.dtype) -> Tensor:
    """`x @ W_enc + b_enc` in the parameters' dtype, the matmul optionally in a lower precision."""
    return affine(x, p.W_enc, p.b_enc, dtype)


def affine(x: Tensor, w: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """`x @ w + b` in `w`'s dtype, the matmul in `dtype`."""
    if dtype == w.dtype:
        return torch.addmm(b, x, w)
    return (x.to(dtype) @ w.to(dtype)).to(w.dtype).add_(b)


def select_active(
    pre: Tensor, threshold: Tensor, obj: Objective, B: int, split: Partition = ALONE
) -> tuple[Active | DenseActive, Window | None, float]:
    """The active latents of `pre [B_local, m]` by the architecture's rule, JumpReLU's STE window,
    and BatchTopK's smallest selected value (for its inference threshold)."""
    arch = obj.architecture
    window: Window | None = None
    min_selected = 0.0
    if arch in ("jumprelu", "relu"):
        theta = threshold if arch == "jumprelu" else torch.zeros_like(threshold)
        half = obj.bandwidth / 2 if arch == "jumprelu" else 0.0
        act, window = select(pre, theta, half, obj.max_density)
    elif arch == "topk":
        act = _topk_active(pre, obj.k, split)
    elif arch == "batchtopk":
        act = _batch_topk(pre, obj.k * B, obj.k, split)
        pos = act.val[act.val > 0]
        least = pos.min() if pos.numel() else torch.tensor(float("inf"))
        min_selected = float(split.min_all(least.float()))
        min_selected = 0.0 if min_selected == float("inf") else min_selected
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return act, window, min_selected


@torch.no_grad()
def forward_backward(
    p: Params,
    x: Tensor,
    y: Tensor,
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
) -> StepStats:
    """One step's loss and gradients (written to `.grad`) for inputs `x [B, d]` and targets `y [B, d]`.

    With a `split`, this rank holds some rows of the batch (sum the gradients over ranks afterwards)
    or some latents (`p` is its slice); losses and statistics are the whole batch's, normalised by
    its size, and TopK/BatchTopK select over every rank's latents.
    """
    B = int(split.over_rows(torch.tensor(x.shape[0])))  # rows of the whole batch
    pre = encoder_pre(x, p, obj.matmul_dtype)  # (B_local, m_local)
    arch = obj.architecture
    act, window, min_selected = select_active(pre, p.threshold, obj, B, split)

    z = act.val  # active values, CSR order (or dense)
    bounds = obj.bounds(p.W_dec.shape[0])
    # What every reconstruction shares: b_dec, and a skip transcoder's x @ W_skip
    base = p.b_dec if p.W_skip is None else torch.addmm(p.b_dec, x, p.W_skip)  # (d,) or (B, d)
    if len(bounds) == 2:
        y_hat = split.over_latents(act.decode(z, p.W_dec)).add_(base)  # (B, d)
        errs = y_hat.sub_(y).unsqueeze(0)  # (1, B, d)
    else:  # Matryoshka: the reconstruction of every prefix (latents not split over ranks)
        y_hats = act.decode_groups(z, p.W_dec, bounds).cumsum_(0).add_(base)  # (G, B, d)
        errs = y_hats.sub_(y)
    sqs = [float(split.over_rows(e.pow(2).sum())) for e in errs]
    sq = sqs[-1]  # the whole dictionary's
    mse = sq / B
    # dL/d(the decoding of group g): the prefixes from g on contain it, (G, B, d)
    gs = (errs if len(errs) == 1 else errs.flip(0).cumsum(0).flip(0)).mul(2.0 / B)
    fired = split.over_rows(act.fired())
    l0 = float(split.over_all(torch.tensor(float(act.nnz)))) / B

    # Gradient at the active entries; the sparsity penalty joins here.
    dz = act.sampled_groups(gs, p.W_dec, bounds)  # dL/dz at active entries
    if arch == "relu":
        dz = dz + obj.coefficient / B * (act.mask if isinstance(act, DenseActive) else 1.0)
        penalty = obj.coefficient * float(split.over_all(z.sum())) / B
    elif arch == "jumprelu":
        p.threshold.grad, penalty = threshold_grad(
            p.threshold, p.W_dec, gs, bounds, window, obj, l0, fired / B, B, split
        )
    else:
        penalty = 0.0
        if isinstance(act, Active):
            dz = dz * (z > 0)
    p.W_dec.grad = act.left_mul_t_groups(z, gs, bounds)  # (m, d)
    p.b_dec.grad = gs[0].sum(0)
    if p.W_skip is not None:
        p.W_skip.grad = x.T @ gs[0]  # (d, d)
    p.W_enc.grad = act.left_mul_t(dz, x).T  # (d, m)
    p.b_enc.grad = act.col_sum(dz)
    if arch != "jumprelu":
        p.threshold.grad = torch.zeros_like(p.threshold)

    aux = 0.0
    if arch in ("topk", "batchtopk") and obj.aux_k and _n_dead(dead, split):
        aux = _aux_k(p, x, pre, -errs[-1], dead, obj, split)
    var = centered_sq(y, split)
    return StepStats(
        loss=sum(sqs) / B + penalty + aux,
        mse=mse,
        fvu=sq / max(var, 1e-12),
        l0=l0,
        fired=fired,
        min_selected=min_selected,
    )


def centered_sq(t: Tensor, split: Partition = ALONE) -> float:
    """`sum ||t_i - mean(t)||^2` over the rows of the whole batch `t [B, d]`."""
    if not split.rows:
        return float((t - t.mean(0)).pow(2).sum())
    n = split.over_rows(torch.tensor(float(t.shape[0]), device=t.device))
    s1 = split.over_rows(t.sum(0))  # (d,)
    s2 = split.over_rows(t.pow(2).sum())
    return float(s2 - s1.pow(2).sum() / n)


def _n_dead(dead: Tensor | None, split: Partition) -> int:
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


def _topk_active(pre: Tensor, k: int, split: Partition) -> Active:
    vals, cols, won = row_topk(pre, k, split)
    if won is None:
        return from_topk(cols, vals.relu(), pre.shape[1])
    rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(cols)
    return _from_entries(rows[won], cols[won], vals[won].relu(), pre.shape)


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


def threshold_grad(
    theta: Tensor,
    W_dec: Tensor,
    gs: Tensor,
    bounds: tuple[int, ...],
    window: Window,
    obj: Objective,
    l0: float,
    freq: Tensor,
    B: int,
    split: Partition = ALONE,
) -> tuple[Tensor, float]:
    """JumpReLU's threshold gradient from both STEs over the window, and the penalties' value."""
    theta = theta.detach()
    eps = obj.bandwidth
    r, c = window.rows, window.cols
    if gs.shape[0] > 1:  # each entry takes the gradient of its latent's group
        r = group_of(bounds)[c] * gs.shape[1] + r
    dz_w = pair_dots(r, c, gs.reshape(-1, gs.shape[-1]), W_dec)  # dL/dz at window entries
    t_w = theta[c]
    # JumpReLU STE: dz * -(t / eps); L0 STE: dpenalty/dL0 * -(1 / eps) / B per entry, and the
    # frequency penalty's d/d f_j * -(1 / eps) / B per entry of latent j.
    dpen_dl0, penalty = obj.l0_penalty_grad(l0), obj.l0_penalty(l0)
    per_entry = dz_w * (-t_w / eps) - dpen_dl0 / (eps * B)
    if obj.frequency_coefficient:
        freq_penalty, dpen_df = obj.frequency_penalty(freq)
        penalty += float(split.over_latents(torch.tensor(freq_penalty)))
        per_entry -= dpen_df[c] / (eps * B)
    return torch.zeros_like(theta).index_add_(0, c, per_entry), penalty


def _batch_topk(pre: Tensor, n: int, k: int, split: Partition) -> Active:
    """The `n = k * B` largest relu'd pre-activations of the whole batch, as entries of this rank."""
    keep = pre >= batch_threshold(pre, n, k, split)  # (B, m)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: CSR order
    return _from_entries(rows, cols, pre[rows, cols].relu(), pre.shape)


def _from_entries(rows: Tensor, cols: Tensor, vals: Tensor, shape: torch.Size) -> Active:
    """`Active` from entries in any order."""
    B, m = shape
    order = torch.argsort(rows * m + cols)
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(B + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return Active(crow, cols.contiguous(), vals.contiguous(), m)


def _aux_k(
    p: Params,
    x: Tensor,
    pre: Tensor,
    residual: Tensor,
    dead: Tensor,
    obj: Objective,
    split: Partition = ALONE,
) -> float:
    """AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones missed."""
    B = int(split.over_rows(torch.tensor(x.shape[0])))
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = min(obj.aux_k, _n_dead(dead, split))
    vals, local, won = row_topk(pre[:, dead_idx], k_aux, split)
    if won is None:
        act = from_topk(dead_idx[local], vals.relu(), pre.shape[1])
    else:
        rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(local)
        act = _from_entries(rows[won], dead_idx[local[won]], vals[won].relu(), pre.shape)
    e_hat = split.over_latents(act.decode(act.val, p.W_dec))  # (B, d)
    var = centered_sq(residual, split) / B
    scale = obj.aux_coefficient / max(var, 1e-12)
    diff = e_hat - residual
    loss = scale * float(split.over_rows(diff.pow(2).sum())) / B
    g = diff.mul_(2.0 * scale / B)
    dz = act.sampled(g, p.W_dec.T) * (act.val > 0)
    p.W_dec.grad += act.left_mul_t(act.val, g)
    p.W_enc.grad += act.left_mul_t(dz, x).T
    p.b_enc.grad += act.col_sum(dz)
    return loss
