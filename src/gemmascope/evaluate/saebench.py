"""SAEBench's core metrics, computed in the evaluation's own forwards (its files: `saebench_files`).

The formulas are those of sae_bench 0.6.0 (`evals/core/main.py`), quirks included, so our numbers
line up with SAEBench's leaderboard. Per evaluation batch b of n_b kept positions (input token not
BOS/EOS/pad), with x the activation (a transcoder's target), x_hat the SAE's output, r = x - x_hat:

- `kl_div_with_sae`, `kl_div_with_ablation`: mean over kept positions of KL(clean || spliced) of the
  next-token distributions; the ablation zeroes the site at every position, special ones included.
  `kl_div_score` = (kl_ablation - kl_sae) / kl_ablation.
- `ce_loss_*`: mean next-token cross-entropy over kept positions that have a next token;
  `ce_loss_score` = (ce_ablation - ce_sae) / (ce_ablation - ce_clean).
- `l0`, `l1`: token means of the count and of the plain sum (not |.|) of the latents.

SAEBench folds each decoder row's norm into its latent before it evaluates (`fold_W_dec_norm`: latent
i times ||W_dec[i]||, decoder rows of unit norm; not for TopK, see `decoder_fold`), so `l1`,
`encoder_norm` and `encoder_bias` are those of the folded SAE; nothing else depends on the scale of
a latent.
- `l2_norm_in`, `l2_norm_out`: token means of ||x||, ||x_hat||; `l2_ratio` the token mean of
  ||x_hat|| / ||x|| (||x|| < 1e-4 counts as 1); `relative_reconstruction_bias` the mean over batches
  of mean_b ||x_hat||^2 / mean_b <x, x_hat>.
- `mse`: the token mean of ||r||^2 / n_b (SAEBench divides each token's squared error by the batch's
  token count: it depends on the batch size; our own `mse` is per element).
- `explained_variance`: 1 - mean_b(mean ||r||^2) / (mean_b(mean ||x||^2) - m^2) with m the mean over
  batches and dimensions of mean x_d^2, as SAEBench writes it (this squares a mean of squares; our
  own `explained_variance` is sklearn's). `explained_variance_legacy`: the token mean of
  1 - ||r||^2 / ||x - mean_b x||^2. `cossim`: the token mean of cos(x, x_hat).
- `feature_density`: share of kept tokens on which a latent is > 0; `frac_alive`,
  `freq_over_{1,10}_percent` and their density-weighted `normalized_` forms from it;
  `consistent_activation_heuristic`: tokens active / sequences active, per latent.
- `average_max_{encoder,decoder}_cosine_sim`: mean over latents of the largest cosine with another
  latent's encoder column (decoder row); exact up to `EXACT_MAX_COSINE` latents, above that averaged
  over a fixed sample of that many latents (each still compared with all others).

Where ours differs from a default SAEBench run: special tokens are never spliced (SAEBench's
`exclude_special_tokens_from_reconstruction=True`), every batch counts for the sparsity and variance
metrics (SAEBench reads 1 batch by default), and KL uses `log_softmax` rather than `log(softmax)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

EXACT_MAX_COSINE = 1 << 15
"""Widths up to this get the exact average max cosine; wider ones a sample of this many latents."""

SAEBENCH_VERSION = "0.6.0"
"""The sae_bench release whose formulas and result schema these are."""

WRITER = f"gemmascope (sae_bench {SAEBENCH_VERSION} formulas)"
"""What our files give as `sae_bench_commit_hash`: how a rerun knows a file of that name is ours."""


@dataclass
class Scores:
    """Next-token scores of one forward, summed over the run: our cross-entropy (the positions the
    package docstring names), SAEBench's cross-entropy and its KL from the clean forward."""

    ce: float = 0.0
    ce_sb: float = 0.0
    kl: float = 0.0

    def add(self, other: Scores) -> None:
        self.ce += other.ce
        self.ce_sb += other.ce_sb
        self.kl += other.kl


@dataclass
class CoreSums:
    """SAEBench's running sums for one SAE (float64 where they grow)."""

    d_sae: int
    fold: Tensor | None = None  # (F,) `decoder_fold`: SAEBench's latents are z * fold
    n: int = 0
    batches: int = 0
    l1: float = 0.0
    l2_in: float = 0.0
    l2_out: float = 0.0
    l2_ratio: float = 0.0
    rrb: float = 0.0  # sum over batches of the batch's relative reconstruction bias
    mse: float = 0.0
    ev_legacy: float = 0.0
    ev_sq: float = 0.0  # sum over batches of mean ||x||^2
    ev_act: float = 0.0  # sum over batches and dimensions of mean x_d^2
    ev_rss: float = 0.0  # sum over batches of mean ||r||^2
    d: int = 0
    cossim: float = 0.0
    fired: Tensor = field(init=False)  # (F,) tokens on which each latent is > 0
    prompts: Tensor = field(init=False)  # (F,) sequences on which it is

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.int64)
        self.prompts = torch.zeros(self.d_sae, dtype=torch.int64)

    def add(self, x: Tensor, z: Tensor, x_hat: Tensor, seq: Tensor, n_seqs: int) -> None:
        """One batch: `[n, d]` activations and outputs, `[n, F]` latents, `[n]` sequence of each row."""
        x, x_hat = x.double(), x_hat.double()
        n = len(x)
        if n == 0:
            return
        r = x - x_hat
        rss = r.pow(2).sum(-1)  # (n,)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)  # (n,)
        self.n += n
        self.batches += 1
        self.d = x.shape[-1]
        scale = None if self.fold is None else self.fold.to(z.device)
        self.l1 += float(z.double().sum() if scale is None else (z.double() @ scale).sum())
        self.l2_in += float(norm_in.sum())
        self.l2_out += float(norm_out.sum())
        self.l2_ratio += float((norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum())
        self.rrb += float(norm_out.pow(2).mean() / (x * x_hat).sum(-1).mean())
        self.mse += float(rss.sum() / n)
        self.ev_legacy += float((1 - rss / (x - x.mean(0)).pow(2).sum(-1)).sum())
        self.ev_sq += float(x.pow(2).sum(-1).mean())
        self.ev_act += float(x.pow(2).mean(0).sum())
        self.ev_rss += float(rss.mean())
        self.cossim += float((x / norm_in[:, None] * (x_hat / norm_out[:, None])).sum(-1).sum())
        active = z > 0  # (n, F)
        self.fired += active.sum(0).cpu()
        per_seq = torch.zeros(n_seqs, z.shape[-1], device=z.device).index_add_(
            0, seq.to(z.device), active.float()
        )  # (n_seqs, F)
        self.prompts += (per_seq > 0).sum(0).cpu()


def core_metrics(
    st: CoreSums,
    l0: float,
    sae: Scores,
    clean: Scores,
    ablated: Scores | None,
    counts: dict[str, int],
    weights: tuple[Tensor, Tensor] | None,
) -> dict[str, dict[str, float | int | None]]:
    """SAEBench's `eval_result_metrics` for the core eval, by category.

    Args:
        st: the SAE's sums; `l0` its mean L0 (computed with our metrics).
        sae, clean, ablated: summed scores with the SAE spliced, clean, with the site zeroed
            everywhere (None without ablations).
        counts: `ce` and `kl` positions scored, `tokens` forwarded.
        weights: `W_enc [d, F]` and `W_dec [F, d]` for the cosine metrics (None to skip them).
    """
    density = st.fired.double() / max(st.n, 1)  # (F,)
    ce_sae, ce_clean = sae.ce_sb / counts["ce"], clean.ce_sb / counts["ce"]
    kl_sae = sae.kl / counts["kl"]
    ce_abl = kl_abl = None
    if ablated is not None:
        ce_abl, kl_abl = ablated.ce_sb / counts["ce"], ablated.kl / counts["kl"]
    total_var = st.ev_sq / st.batches - (st.ev_act / (st.batches * st.d)) ** 2
    total = float(density.sum())
    enc, dec = (None, None) if weights is None else weights
    return {
        "model_behavior_preservation": {
            "kl_div_score": _ratio(None if kl_abl is None else kl_abl - kl_sae, kl_abl),
            "kl_div_with_ablation": kl_abl, "kl_div_with_sae": kl_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": _ratio(None if ce_abl is None else ce_abl - ce_sae,
                                    None if ce_abl is None else ce_abl - ce_clean),
            "ce_loss_with_ablation": ce_abl, "ce_loss_with_sae": ce_sae,
            "ce_loss_without_sae": ce_clean,
        },
        "reconstruction_quality": {
            "explained_variance": _ratio(total_var - st.ev_rss / st.batches, total_var),
            "explained_variance_legacy": st.ev_legacy / st.n, "mse": st.mse / st.n,
            "cossim": st.cossim / st.n,
        },
        "shrinkage": {
            "l2_norm_in": st.l2_in / st.n, "l2_norm_out": st.l2_out / st.n,
            "l2_ratio": st.l2_ratio / st.n, "relative_reconstruction_bias": st.rrb / st.batches,
        },
        "sparsity": {"l0": l0, "l1": st.l1 / st.n},
        "token_stats": {"total_tokens_eval_reconstruction": counts["tokens"],
                        "total_tokens_eval_sparsity_variance": counts["tokens"]},
        "misc_metrics": {
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "normalized_freq_over_1_percent": float(density[density > 0.01].sum() / total) if total else 0.0,
            "normalized_freq_over_10_percent": float(density[density > 0.1].sum() / total) if total else 0.0,
            "average_max_encoder_cosine_sim": None if enc is None else float(max_cosine(enc).mean()),
            "average_max_decoder_cosine_sim": None if dec is None else float(max_cosine(dec.T).mean()),
            "frac_alive": float((density > 0).double().mean()),
        },
    }  # fmt: skip


def latent_details(st: CoreSums, weights: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, list]:
    """SAEBench's per-latent `eval_result_details` as parallel lists: density and consistency from
    the run, encoder bias and norm (of the folded SAE), encoder-decoder cosine and max cosines from
    the weights."""
    density = st.fired.double() / max(st.n, 1)
    out: dict[str, list] = {
        "feature_density": density.tolist(),
        "consistent_activation_heuristic": (st.fired.double() / st.prompts.double()).tolist(),
    }
    if weights is not None:
        enc, dec, b_enc = (w.detach().float().cpu() for w in weights)
        fold = torch.ones(len(b_enc)) if st.fold is None else st.fold.float().cpu()  # (F,)
        out.update(
            encoder_bias=(b_enc * fold).tolist(), encoder_norm=(enc.norm(dim=0) * fold).tolist(),
            encoder_decoder_cosine_sim=F.cosine_similarity(enc.T, dec, dim=-1).tolist(),
            max_encoder_cosine_sim=max_cosine(enc, every=True).tolist(),
            max_decoder_cosine_sim=max_cosine(dec.T, every=True).tolist(),
        )  # fmt: skip
    return out


def decoder_fold(w_dec: Tensor, architecture: str) -> Tensor | None:
    """SAELens's `fold_W_dec_norm`, which SAEBench applies before it evaluates: latent i is scaled by
    ||W_dec[i]|| (`[F]`, float64) and its decoder row becomes a unit vector. `w_dec` `[F, d]` is in
    the activations' units (an input scale folded in). None for TopK, which SAELens cannot fold and
    SAEBench then evaluates as it is."""
    if architecture == "topk":
        return None
    return torch.linalg.vector_norm(w_dec.detach(), dim=1, dtype=torch.float64)


def max_cosine(w: Tensor, *, every: bool = False, chunk: int = 1024) -> Tensor:
    """Each latent's largest cosine with another latent, from `[d, F]` columns: `[F]`, or `[s]` for
    a seeded sample of `EXACT_MAX_COSINE` latents when F is larger and `every` is False."""
    unit = F.normalize(w.detach().float(), dim=0)  # (d, F)
    n = unit.shape[1]
    rows = torch.arange(n)
    if n > EXACT_MAX_COSINE and not every:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:EXACT_MAX_COSINE]
    out = torch.empty(len(rows))
    for i in range(0, len(rows), chunk):
        idx = rows[i : i + chunk].to(unit.device)
        sims = unit[:, idx].T @ unit  # (c, F)
        sims[torch.arange(len(idx)), idx] = float("-inf")
        out[i : i + chunk] = sims.max(1).values.cpu()
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den
