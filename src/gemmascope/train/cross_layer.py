"""Training a cross-layer transcoder: every layer's encoder on one read of all layers, the sparse
decoders of each layer's latents writing into their layer and every later one.

The step is the one-layer step (`objectives`) with the decoders widened: layer `i`'s latents decode
with one `[F, (L - i) d]` matrix into the targets of layers `i..L-1` at once, so each layer's active
latents cost one sparse product forward and two backward whatever the number of targets. The
residual of a target is shared by every layer that writes it, so the decoder rows into a layer
step as far together as one transcoder's would (`CLTParams.step_scale`); the sparsity penalty is
each layer's own (its L0 against the target). Each latent's decoder rows over all its targets have
unit norm together, as a one-layer decoder row has alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemmascope.common.distributed import Partition
from gemmascope.train.dense import _dense_select, _Summed
from gemmascope.train.objectives import (
    ALONE,
    Active,
    DenseActive,
    Objective,
    StepStats,
    affine,
    centered_sq,
    select_active,
    threshold_grad,
)


class CLTParams(nn.Module):
    """A CLT's training parameters in normalised units: per layer `i`, `W_enc.i [d, F]`,
    `b_enc.i`, `threshold.i [F]`, `W_dec.i [F, (L - i) d]` (`W_skip.i [d, d]`); `b_dec [L, d]`."""

    def __init__(self, n_layers: int, d_in: int, d_sae: int, threshold: float,
                 generator: torch.Generator, encoder_scale: float = 1.0,
                 skip: bool = False) -> None:  # fmt: skip
        super().__init__()
        L, d, m = n_layers, d_in, d_sae
        enc, dec = [], []
        bound = (6.0 / d) ** 0.5
        for i in range(L):
            # As a one-layer transcoder starts (`Params`); the rows into later layers start at zero.
            w = torch.empty(m, d).uniform_(-bound, bound, generator=generator)
            w /= w.norm(dim=1, keepdim=True)
            enc.append(nn.Parameter(w.T * encoder_scale))
            dec.append(nn.Parameter(torch.cat([w, torch.zeros(m, (L - 1 - i) * d)], 1)))
        self.W_enc, self.W_dec = nn.ParameterList(enc), nn.ParameterList(dec)
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(m)) for _ in range(L)])
        self.threshold = nn.ParameterList(
            [nn.Parameter(torch.full((m,), float(threshold))) for _ in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = (
            nn.ParameterList([nn.Parameter(torch.zeros(d, d)) for _ in range(L)]) if skip else None
        )

    @property
    def n_layers(self) -> int:
        return len(self.W_enc)

    def step_scale(self, name: str) -> Tensor | None:
        """Per column of `W_dec.i`: 1 / the number of layers writing that column's target. Every
        writer of a target moves with the same residual, so unscaled a target of layer `l` would
        move `l + 1` times as far per step as a one-layer transcoder's output, which diverges."""
        kind, _, i = name.partition(".")
        if kind != "W_dec":
            return None
        L, d = self.n_layers, self.b_dec.shape[1]
        writers = torch.arange(int(i), L) + 1.0  # target j = i + k has j + 1 writers
        return (1.0 / writers).repeat_interleave(d)


@torch.no_grad()
def clt_forward_backward(
    p: CLTParams,
    xs: list[Tensor],
    ys: list[Tensor],
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
) -> StepStats:
    """One step's loss and gradients (written to `.grad`) for per-layer inputs `xs` and targets
    `ys` (each `[B, d]`); `split` over rows only. L0 in the stats is the mean over layers."""
    if split.latents:
        raise ValueError("a CLT trains with its latents on one rank; use `parallel` data")
    L, (n, d) = p.n_layers, xs[0].shape
    B = int(split.over_rows(torch.tensor(n)))
    acts, windows, l0s = [], [], []
    y_hat = p.b_dec.expand(n, L, d).clone()  # (B, L, d)
    for i in range(L):
        pre = affine(xs[i], p.W_enc[i], p.b_enc[i], obj.matmul_dtype)  # (B, m)
        act, window, _ = select_active(pre, p.threshold[i], obj, B, split)
        acts.append(act)
        windows.append(window)
        l0s.append(float(split.over_rows(torch.tensor(float(act.nnz)))) / B)
        y_hat[:, i:] += act.decode(act.val, p.W_dec[i]).view(n, L - i, d)
        if p.W_skip is not None:
            y_hat[:, i] += xs[i] @ p.W_skip[i]
    err = y_hat.sub_(torch.stack(ys, 1))  # (B, L, d)
    sq = float(split.over_rows(err.pow(2).sum()))
    g = err.mul_(2.0 / B)  # dL/dy_hat
    penalty = 0.0
    fired = []
    for i, (act, window) in enumerate(zip(acts, windows, strict=True)):
        gi = g[:, i:].reshape(n, -1)  # (B, (L - i) d): the residuals layer i writes
        f = split.over_rows(act.fired())
        fired.append(f)
        dz = act.sampled(gi, p.W_dec[i].T)
        if obj.architecture == "jumprelu":
            p.threshold[i].grad, pen = threshold_grad(
                p.threshold[i], p.W_dec[i], gi[None], (0, act.m), window, obj,
                l0s[i], f / B, B, split,
            )  # fmt: skip
            penalty += pen
        else:
            p.threshold[i].grad = torch.zeros_like(p.threshold[i])
            if obj.architecture == "relu":
                dz = dz + obj.coefficient / B * (act.mask if isinstance(act, DenseActive) else 1.0)
                penalty += obj.coefficient * float(split.over_rows(act.val.sum())) / B
            elif isinstance(act, Active):
                dz = dz * (act.val > 0)
        p.W_dec[i].grad = act.left_mul_t(act.val, gi)  # (m, (L - i) d)
        p.W_enc[i].grad = act.left_mul_t(dz, xs[i]).T  # (d, m)
        p.b_enc[i].grad = act.col_sum(dz)
        if p.W_skip is not None:
            p.W_skip[i].grad = xs[i].T @ g[:, i]
    p.b_dec.grad = g.sum(0)
    var = sum(centered_sq(y, split) for y in ys)
    return StepStats(loss=sq / B + penalty, mse=sq / B, fvu=sq / max(var, 1e-12),
                     l0=sum(l0s) / L, fired=torch.cat(fired))  # fmt: skip


def dense_clt_forward_backward(
    p: CLTParams,
    xs: list[Tensor],
    ys: list[Tensor],
    obj: Objective,
    dead: Tensor | None = None,
    split: Partition = ALONE,
) -> StepStats:
    """`clt_forward_backward` through autograd on dense tensors: the path off the CPU, and the
    reference the sparse step is tested against."""
    if split.latents:
        raise ValueError("a CLT trains with its latents on one rank; use `parallel` data")
    for q in p.parameters():
        q.grad = None
    L, (n, d) = p.n_layers, xs[0].shape
    B = int(split.over_rows(torch.tensor(n, device=xs[0].device)))
    with torch.enable_grad():
        y_hat = [p.b_dec[i].expand(n, d) for i in range(L)]
        penalty, l0, fired = 0.0, 0.0, []
        for i in range(L):
            pre = affine(xs[i], p.W_enc[i], p.b_enc[i], obj.matmul_dtype)
            view = _Layer(p.threshold[i])
            z, mask, counts, _ = _dense_select(pre, view, obj, B, split)  # type: ignore[arg-type]
            out = (z @ p.W_dec[i]).view(n, L - i, d)
            for j in range(i, L):
                y_hat[j] = y_hat[j] + out[:, j - i]
            if p.W_skip is not None:
                y_hat[i] = y_hat[i] + xs[i] @ p.W_skip[i]
            counts = _Summed.apply(counts, split.over_rows)  # (m,) over the whole batch
            l0_i = counts.sum() / B
            if obj.architecture == "jumprelu":
                penalty = penalty + obj.l0_penalty(l0_i)
                if obj.frequency_coefficient:
                    over = (counts / B / obj.max_frequency - 1).clamp(min=0)
                    penalty = penalty + obj.frequency_coefficient * over.pow(2).sum()
            elif obj.architecture == "relu":
                penalty = penalty + obj.coefficient * z.sum() / B
            l0 += float(l0_i.detach())
            fired.append(counts.detach())
        sq = sum((yh - y).pow(2).sum() for yh, y in zip(y_hat, ys, strict=True))
        loss = sq / B + penalty
        loss.backward()
    for q in p.parameters():
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    mse = float(split.over_rows(sq.detach().clone())) / B
    var = sum(centered_sq(y, split) for y in ys)
    penalty = float(penalty.detach()) if isinstance(penalty, Tensor) else penalty
    return StepStats(loss=mse + penalty, mse=mse, fvu=mse * B / max(var, 1e-12),
                     l0=l0 / L, fired=torch.cat(fired))  # fmt: skip


class _Layer:
    """What `dense._dense_select` reads of the parameters: the layer's threshold."""

    def __init__(self, threshold: Tensor) -> None:
        self.threshold = threshold
