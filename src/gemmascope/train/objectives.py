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
from gemmascope.train.topk import (
    ALONE,
    batch_topk_active,
    from_entries,
    row_topk,
    topk_active,
)


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
    block: int = 0
    """Latents per block of the encoder matmul (0: all at once), so `[B, block]` is the widest
    per-step matrix (`TrainConfig.block_latents`)."""
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
    if arch in ("jumprelu", "relu"):
        act, window = select(pre, *select_rule(threshold, obj))
    elif arch == "topk":
        act = topk_active(pre, obj.k, split)
    elif arch == "batchtopk":
        act = batch_topk_active(pre, obj.k * B, obj.k, split)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return act, window, min_selected_value(act, split) if arch == "batchtopk" else 0.0


def select_rule(threshold: Tensor, obj: Objective) -> tuple[Tensor, float, float]:
    """`select`'s threshold, STE half-width and density limit for JumpReLU (ReLU: 0, no window)."""
    if obj.architecture == "jumprelu":
        return threshold, obj.bandwidth / 2, obj.max_density
    return torch.zeros_like(threshold), 0.0, obj.max_density


def min_selected_value(act: Active, split: Partition) -> float:
    pos = act.val[act.val > 0]
    least = float(split.min_all((pos.min() if pos.numel() else torch.tensor(float("inf"))).float()))
    return 0.0 if least == float("inf") else least


def centered_sq(t: Tensor, split: Partition = ALONE) -> float:
    """`sum ||t_i - mean(t)||^2` over the rows of the whole batch `t [B, d]`."""
    if not split.rows:
        return float((t - t.mean(0)).pow(2).sum())
    n = split.over_rows(torch.tensor(float(t.shape[0]), device=t.device))
    s1 = split.over_rows(t.sum(0))  # (d,)
    s2 = split.over_rows(t.pow(2).sum())
    return float(s2 - s1.pow(2).sum() / n)


def jump_penalty(
    obj: Objective, l0: float, freq: Tensor, split: Partition = ALONE
) -> tuple[float, float, Tensor | None]:
    """JumpReLU's penalties at mean L0 `l0` and firing shares `freq [m]`: their value, d/dL0, and
    d/d freq (`[m]`, None without the frequency penalty)."""
    penalty, dpen_dl0, dpen_df = obj.l0_penalty(l0), obj.l0_penalty_grad(l0), None
    if obj.frequency_coefficient:
        freq_penalty, dpen_df = obj.frequency_penalty(freq)
        penalty += float(split.over_latents(torch.tensor(freq_penalty)))
    return penalty, dpen_dl0, dpen_df


def window_grad(theta: Tensor, W_dec: Tensor, gs: Tensor, bounds: tuple[int, ...],
                window: Window, eps: float, dpen_dl0: float, dpen_df: Tensor | None,
                B: int) -> Tensor:  # fmt: skip
    """The threshold gradient from both STEs over the window: JumpReLU's, dz * -(t / eps), and
    the L0's (and the frequency penalty's), d penalty * -(1 / eps) / B per entry."""
    r, c = window.rows, window.cols
    if gs.shape[0] > 1:  # each entry takes the gradient of its latent's group
        r = group_of(bounds)[c] * gs.shape[1] + r
    dz_w = pair_dots(r, c, gs.reshape(-1, gs.shape[-1]), W_dec)  # dL/dz at window entries
    per_entry = dz_w * (-theta.detach()[c] / eps) - dpen_dl0 / (eps * B)
    if dpen_df is not None:
        per_entry -= dpen_df[c] / (eps * B)
    return torch.zeros(theta.shape, dtype=per_entry.dtype).index_add_(0, c, per_entry)


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
    """JumpReLU's threshold gradient over all of `theta`'s latents, and the penalties' value."""
    penalty, dpen_dl0, dpen_df = jump_penalty(obj, l0, freq, split)
    return window_grad(theta, W_dec, gs, bounds, window, obj.bandwidth, dpen_dl0, dpen_df,
                       B), penalty  # fmt: skip


def aux_candidates(pre: Tensor, dead: Tensor, k_aux: int, split: Partition) -> Active:
    """Each row's `k_aux` largest pre-activations among the dead latents (over every rank's)."""
    dead_idx = dead.nonzero().squeeze(1)
    vals, local, won = row_topk(pre[:, dead_idx], k_aux, split)
    if won is None:
        return from_topk(dead_idx[local], vals.relu(), pre.shape[1])
    rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(local)
    return from_entries(rows[won], dead_idx[local[won]], vals[won].relu(), pre.shape)


def aux_k_loss(act: Active, W_dec: Tensor, residual: Tensor, obj: Objective, B: int,
           split: Partition) -> tuple[float, Tensor]:  # fmt: skip
    """AuxK (Gao et al. 2024): the dead latents `act` learn to reconstruct what the live ones
    missed. Its loss and dL/d(their reconstruction) `[n, d]`."""
    e_hat = split.over_latents(act.decode(act.val, W_dec))  # (n, d)
    scale = obj.aux_coefficient / max(centered_sq(residual, split) / B, 1e-12)
    diff = e_hat - residual
    loss = scale * float(split.over_rows(diff.pow(2).sum())) / B
    return loss, diff.mul_(2.0 * scale / B)
