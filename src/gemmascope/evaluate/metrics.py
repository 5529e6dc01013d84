"""Running sums over the evaluated tokens and the record of metrics each SAE gets (see the package
docstring for the definitions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmascope.evaluate.saebench import (
    CoreSums,
    Scores,
    core_metrics,
    decoder_fold,
    latent_details,
)
from gemmascope.models import SiteKey
from gemmascope.sae import SAE

DENSE_ABOVE = 0.1
"""A latent active on more than this share of tokens counts as dense."""


DENSITY_EDGES = [round(-10 + 0.25 * i, 2) for i in range(41)]
"""Bin edges of the log10 feature-density histogram, fixed so histograms of any run compare."""


L0_QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


def token_losses(model: nn.Module, hidden: Tensor, labels: Tensor, *, chunk: int = 512) -> Tensor:
    """Next-token cross-entropy from final hidden states, `chunk` positions at a time.

    Args:
        model: the causal LM whose output embedding (and final logit soft-capping) to apply.
        hidden: `[n, d_model]` final hidden states (after the final norm), as the head receives them.
        labels: `[n]` target token ids.
        chunk: positions per chunk; memory is about 2 x chunk x vocab x 4 bytes.
    Returns:
        `[n]` float32 losses in nats.
    """
    if chunk < 1:
        raise ValueError(f"`chunk` must be at least 1, got {chunk}")
    out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(labels), chunk):
        logits = _logits(model, hidden[i : i + chunk])  # (c, vocab)
        out[i : i + chunk] = F.cross_entropy(logits, labels[i : i + chunk], reduction="none")
    return out


def logit_scores(
    model: nn.Module,
    clean: Tensor,
    others: Sequence[Tensor],
    labels: Tensor,
    ours: Tensor,
    *,
    chunk: int = 512,
) -> list[Scores]:
    """Cross-entropies and KL from the clean run of several forwards of the same positions.

    Args:
        model: the causal LM (its output embedding and soft-capping).
        clean: `[n, d_model]` final hidden states of the clean forward.
        others: `[n, d_model]` final hidden states of each spliced or ablated forward.
        labels: `[n]` next token ids, -1 where there is none (a sequence's last position).
        ours: `[n]` bool, the positions our cross-entropy scores (a subset of `labels >= 0`).
        chunk: positions per chunk; memory is about 3 x chunk x vocab x 4 bytes.
    Returns:
        Summed `Scores` of the clean forward (KL 0), then of each of `others`.
    """
    out = [Scores() for _ in range(1 + len(others))]
    has = labels >= 0
    for i in range(0, len(labels), chunk):
        part = slice(i, i + chunk)
        lab = labels[part].clamp_min(0)[:, None]  # (c, 1)
        keep, keep_sb = ours[part], has[part]
        logits_clean = _logits(model, clean[part])  # (c, vocab)
        lse_clean = torch.logsumexp(logits_clean, -1)  # (c,)
        p_clean = (logits_clean - lse_clean[:, None]).exp_()  # (c, vocab)
        plogp = _rowdot(p_clean, logits_clean) - lse_clean  # (c,) sum p log p
        for score, hidden in zip(out, [None, *others], strict=True):
            logits = logits_clean if hidden is None else _logits(model, hidden[part])
            lse = lse_clean if hidden is None else torch.logsumexp(logits, -1)  # (c,)
            nll = (lse - logits.gather(1, lab)[:, 0]).double()  # (c,)
            score.ce += float(nll[keep].sum())
            score.ce_sb += float(nll[keep_sb].sum())
            if hidden is not None:  # KL(clean || this) = sum p log p - sum p (logits - lse)
                score.kl += float((plogp - _rowdot(p_clean, logits) + lse).double().sum())
    return out


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """`[c]` row-wise dot products of two `[c, v]` matrices, without a `[c, v]` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """`[c, vocab]` float32 logits from final hidden states, soft-capped where the model does."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    logits = F.linear(hidden, head.weight, head.bias).float()
    return torch.tanh(logits / cap) * cap if cap else logits


# ---------------------------------------------------------------- running sums
@dataclass
class Sums:
    """Running sums of one SAE over the evaluated tokens (float64 where sums grow)."""

    sum_x: Tensor  # (d,) float64
    sum_r: Tensor  # (d,) float64, r = x - x_hat
    fired: Tensor  # (d_sae,) int64 tokens on which each latent was active
    l0: list[Tensor] = field(default_factory=list)  # per-token active counts
    n: int = 0
    sq_x: float = 0.0
    sq_r: float = 0.0
    cosine: float = 0.0
    rel_norm: float = 0.0
    scores: Scores = field(default_factory=Scores)
    core: CoreSums = field(default_factory=lambda: CoreSums(0))  # SAEBench's sums

    @classmethod
    def new(cls, sae: Any) -> Sums:
        z = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
        weights = _weights(sae)
        fold = None if weights is None else decoder_fold(weights[1], sae.cfg.architecture)
        return cls(sum_x=z, sum_r=z.clone(), fired=torch.zeros(sae.cfg.d_sae, dtype=torch.int64),
                   core=CoreSums(sae.cfg.d_sae, fold))  # fmt: skip


@dataclass
class Totals:
    """Everything accumulated over the batches, shared by every SAE."""

    stats: list[Sums]
    # ((layer, site), kind) -> scores; kind "zero" | "mean" (special positions kept) | "zero_all"
    ablated: dict[tuple[SiteKey, str], Scores]
    clean: Scores = field(default_factory=Scores)
    loss_tokens: int = 0  # positions our cross-entropy scores
    sb_ce_tokens: int = 0  # SAEBench's cross-entropy positions
    sb_kl_tokens: int = 0  # SAEBench's KL positions
    tokens: int = 0  # every token forwarded


def accumulate(st: Sums, x: Tensor, z: Tensor, x_hat: Tensor, seq: Tensor, n_seqs: int) -> None:
    """Add one batch of `[n, d]` activations, `[n, d_sae]` latents and reconstructions; `seq` `[n]`
    is the sequence of each row, of `n_seqs` in the batch."""
    st.core.add(x, z, x_hat, seq, n_seqs)
    # float64: the centred sums below subtract large numbers, and means of the residual stream are large
    x, x_hat = x.double(), x_hat.double()
    r = x - x_hat
    norm_x, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)  # (n,)
    active = z != 0  # (n, d_sae)
    st.n += len(x)
    st.sum_x += x.sum(0).cpu()
    st.sum_r += r.sum(0).cpu()
    st.sq_x += float(x.pow(2).sum())
    st.sq_r += float(r.pow(2).sum())
    st.cosine += float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
    st.rel_norm += float((norm_hat / norm_x.clamp_min(1e-12)).sum())
    st.fired += active.sum(0).cpu()
    st.l0.append(active.sum(-1).to(torch.int32).cpu())


def record(
    sae: SAE, key: SiteKey, st: Sums, run: Totals, model_name: str | None, *, details: bool = False
) -> dict[str, Any]:
    c = sae.cfg
    n, d = st.n, c.d_in
    if n == 0:
        raise ValueError(
            "every evaluated position is a special token (BOS/EOS/pad); nothing to score"
        )
    mean_x = st.sum_x / n
    tss = st.sq_x - n * float(mean_x.pow(2).sum())  # sum of ||x - mean(x)||^2
    rss_centred = st.sq_r - float(st.sum_r.pow(2).sum()) / n
    l0 = torch.cat(st.l0).double().numpy()
    density = st.fired.double().numpy() / n
    alive = density[density > 0]
    hist, _ = np.histogram(np.log10(alive), bins=DENSITY_EDGES)
    ce = {
        "clean": run.clean.ce,
        "spliced": st.scores.ce,
        **{
            k: run.ablated[key, k].ce if (key, k) in run.ablated else None for k in ("zero", "mean")
        },
    }
    ce = {k: None if v is None else v / run.loss_tokens for k, v in ce.items()}
    weights = _weights(sae)
    counts = {"ce": run.sb_ce_tokens, "kl": run.sb_kl_tokens, "tokens": run.tokens}
    core = core_metrics(st.core, float(l0.mean()), st.scores, run.clean,
                        run.ablated.get((key, "zero_all")), counts,
                        None if weights is None else weights[:2])  # fmt: skip
    out = {
        "source": None, "sae_id": None, "model": model_name or c.model, "layer": c.layer,
        "site": c.site, "target_site": c.target_site, "skip_connection": c.skip_connection,
        "width": c.d_sae, "d_in": d, "architecture": c.architecture, "k": c.k,
        "dtype": c.dtype, "tokens": n, "loss_tokens": run.loss_tokens,
        "l0": float(l0.mean()), "l0_std": float(l0.std()),
        "l0_quantiles": {name: float(np.quantile(l0, q)) for name, q in L0_QUANTILES.items()},
        "mse": st.sq_r / (n * d), "fvu": st.sq_r / tss if tss > 0 else None,
        "explained_variance": 1 - rss_centred / tss if tss > 0 else None,
        "cosine": st.cosine / n, "relative_norm": st.rel_norm / n,
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
        "ce_mean": ce["mean"], "delta_lm_loss": ce["spliced"] - ce["clean"],
        "frac_recovered": _recovered(ce["zero"], ce["spliced"], ce["clean"]),
        "frac_recovered_mean": _recovered(ce["mean"], ce["spliced"], ce["clean"]),
        "dead": int((density == 0).sum()), "dense": int((density > DENSE_ABOVE).sum()),
        "density_hist": {"log10_edges": DENSITY_EDGES, "counts": hist.tolist()},
        "tokens_trained": c.tokens_trained,
        "cross_layer": "clt" in c.extra,  # a layer of a CLT: its output holds earlier layers' too
        "saebench": {"core": core},
    }  # fmt: skip
    if details:
        out["saebench_details"] = latent_details(st.core, weights)
    return out


def _weights(sae: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """`W_enc [d, F]`, `W_dec [F, d]` (into its own layer, for a CLT layer) and `b_enc [F]`, in the
    activations' units (an input scale C folded in: W_enc / C, W_dec * C)."""
    if hasattr(sae, "clt"):
        sae = sae.clt.layer_transcoder(sae.i)
    if not isinstance(sae, SAE):
        return None
    c = sae.cfg.input_scale
    if c == 1.0:
        return sae.W_enc, sae.W_dec, sae.b_enc
    return sae.W_enc.detach() / c, sae.W_dec.detach() * c, sae.b_enc


def _recovered(ablated: float | None, spliced: float, clean: float) -> float | None:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); None without the ablation."""
    if ablated is None or ablated == clean:
        return None
    return (ablated - spliced) / (ablated - clean)
