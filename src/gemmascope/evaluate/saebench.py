"""SAEBench's core metrics, computed in the evaluation's own forwards, and SAEBench's result files.

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
i times ||W_dec[i]||, decoder rows of unit norm), so `l1`, `encoder_norm` and `encoder_bias` are
those of the folded SAE; nothing else depends on the scale of a latent.
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

import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    dec_norm: Tensor | None = (
        None  # (F,) ||W_dec[i]||: SAEBench's latents are those of the folded SAE
    )
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
        scale = None if self.dec_norm is None else self.dec_norm.to(z.device)
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
        fold = dec.norm(dim=1)  # (F,)
        out.update(
            encoder_bias=(b_enc * fold).tolist(), encoder_norm=(enc.norm(dim=0) * fold).tolist(),
            encoder_decoder_cosine_sim=F.cosine_similarity(enc.T, dec, dim=-1).tolist(),
            max_encoder_cosine_sim=max_cosine(enc, every=True).tolist(),
            max_decoder_cosine_sim=max_cosine(dec.T, every=True).tolist(),
        )  # fmt: skip
    return out


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


# ---------------------------------------------------------------- result files
def core_output(
    record: dict[str, Any], settings: dict[str, Any], sae_cfg: dict[str, Any]
) -> dict[str, Any]:
    """A record as SAEBench's `CoreEvalOutput` (its JSON schema): config, metrics, per-latent details.

    Non-finite and missing values are written as -1, as SAEBench does for NaN."""
    core = record["saebench"]["core"]
    details = record.get("saebench_details") or {}
    n = len(next(iter(details.values()), []))
    rows = [{"index": i, **{k: _finite(v[i]) for k, v in details.items()}} for i in range(n)]
    context, batch = settings.get("context_size", 1024), settings.get("batch_size", 8)
    batches = math.ceil(math.ceil(settings.get("tokens", context) / context) / batch)
    config = {
        "model_name": record["model"] or "", "llm_dtype": settings.get("model_dtype", "float32"),
        "batch_size_prompts": batch, "n_eval_reconstruction_batches": batches,
        "n_eval_sparsity_variance_batches": batches,
        "dataset": str(settings.get("corpus", "default")),
        "context_size": context,
        "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": "encoder_norm" in details,
        "exclude_special_tokens_from_reconstruction": True, "verbose": False,
    }  # fmt: skip
    metrics = {cat: {k: _finite(v) for k, v in values.items()} for cat, values in core.items()}
    return _output(record, "core", config, metrics, rows, sae_cfg)


def sparse_probing_output(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A record's sparse probing results as SAEBench's `SparseProbingEvalOutput`."""
    found = record["saebench"]["sparse_probing"]
    config = {
        "random_seed": 0, "dataset_names": [r["dataset_name"] for r in found["details"]],
        "probe_train_set_size": settings.get("probe_train", 1000),
        "probe_test_set_size": settings.get("probe_test", 250),
        "context_length": settings.get("probe_context", 128),
        "sae_batch_size": settings.get("batch_size", 8),
        "llm_batch_size": settings.get("batch_size", 8),
        "llm_dtype": settings.get("model_dtype", "float32"), "model_name": record["model"] or "",
        "k_values": settings.get("probe_k", [1, 2, 5]), "lower_vram_usage": False,
    }  # fmt: skip
    metrics = {"llm": found["llm"], "sae": found["sae"]}
    return _output(record, "sparse_probing", config, metrics, found["details"], None)


def absorption_output(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A record's absorption results as SAEBench's `AbsorptionEvalOutput` (per-letter details in its
    fields; the probes' F1 per letter in `eval_result_unstructured`)."""
    from gemmascope.evaluate import absorption as a

    found = record["saebench"]["absorption"]
    config = {
        "model_name": record["model"] or "", "random_seed": a.SEED, "f1_jump_threshold": a.F1_JUMP,
        "max_k_value": a.MAX_K, "prompt_template": "{word}" + a.TEMPLATE, "prompt_token_pos": -6,
        "llm_batch_size": settings.get("batch_size", 8),
        "llm_dtype": settings.get("model_dtype", "float32"), "k_sparse_probe_l1_decay": 0.01,
        "k_sparse_probe_batch_size": a.PROBE_BATCH, "k_sparse_probe_num_epochs": 50,
        "min_GT_probe_f1": a.MIN_PROBE_F1, "min_feats_for_eval": a.MIN_LETTERS,
        "eval_k_sparse_probe_batch_size": a.PROBE_BATCH, "precalc_k_sparse_probe_sae_acts": True,
    }  # fmt: skip
    fields = ("first_letter", "mean_absorption_fraction", "full_absorption_rate",
              "num_full_absorption", "num_probe_true_positives", "num_split_features")  # fmt: skip
    details = [{k: _finite(row[k]) for k in fields} for row in found["details"]]
    out = _output(record, "absorption_first_letter", config, {"mean": found["mean"]}, details, None)
    out["eval_result_unstructured"] = {
        "words": settings.get("absorption_words"), "probe_f1": dict(zip(a.LETTERS, found["probe_f1"], strict=True))
    }  # fmt: skip
    return out


def _output(
    record: dict[str, Any], eval_type: str, config: dict[str, Any], metrics: dict[str, Any],
    details: list[dict[str, Any]], sae_cfg: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """The fields every SAEBench result file has (its `BaseEvalOutput`) around one eval's own."""
    release, sae_id = _ids(record)
    return {
        "eval_type_id": eval_type, "eval_config": config, "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
        "eval_result_details": details, "sae_bench_commit_hash": WRITER, "sae_lens_id": sae_id,
        "sae_lens_release_id": release, "sae_lens_version": None, "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": None,
    }  # fmt: skip


def output_name(record: dict[str, Any]) -> str:
    """SAEBench's file name for a record: `{release}_{sae_id}_eval_results.json`, made path-safe."""
    release, sae_id = _ids(record)
    name = f"{release}_{sae_id}_eval_results.json"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _ids(record: dict[str, Any]) -> tuple[str, str]:
    """(release, SAE id) of a record: the source and `sae_id`, or the source's folder and name."""
    src = Path(str(record.get("source")))
    release, sae_id = (
        (src.name, record["sae_id"]) if record.get("sae_id") else (src.parent.name, src.name)
    )
    if record.get("cross_layer"):
        sae_id = f"{sae_id}_layer_{record['layer']}"
    return release or ".", sae_id


def _finite(v: Any) -> Any:
    return -1 if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def saebench_paths(
    folder: str | Path, records: list[dict[str, Any]], evals: list[str]
) -> list[Path]:
    """Where `write_saebench` puts each record's file of each eval (`source`, `sae_id`, `layer`,
    `cross_layer` are read), after checking that no file there is foreign and no two records share
    a name."""
    from gemmascope.common.files import read_json

    names = [output_name(r) for r in records]
    if len(set(names)) < len(names):
        raise ValueError(f"two SAEs would share a SAEBench file name in {folder}; give --sae-id")
    paths = [Path(folder) / kind / name for kind in evals for name in names]
    for path in paths:
        if path.exists():
            try:
                ours = str(read_json(path).get("sae_bench_commit_hash", "")).startswith(
                    "gemmascope"
                )
            except ValueError:
                ours = False
            if not ours:
                raise FileExistsError(
                    f"{path} exists and was not written by gemmascope; choose another "
                    "--saebench-out folder or move the file"
                )
    return paths


def write_saebench(
    folder: str | Path,
    records: list[dict[str, Any]],
    settings: dict[str, Any],
    sae_cfgs: list[dict[str, Any]],
) -> list[Path]:
    """Write each record (evaluated with `details=True`) as SAEBench's result file of each eval it
    holds, `folder/{eval}/{release}_{sae_id}_eval_results.json` (SAEBench's `eval_results` layout),
    atomically; a file of the same name that gemmascope did not write is refused, not replaced."""
    from gemmascope.common.files import write_json

    written = []
    for kind in ("core", "absorption", "sparse_probing"):
        # absorption: not for transcoders, nor where too few letters have a probe (no metrics)
        pairs = [(r, cfg) for r, cfg in zip(records, sae_cfgs, strict=True)
                 if r["saebench"].get(kind) is not None and r["saebench"][kind].get("mean") != {}]  # fmt: skip
        paths = saebench_paths(folder, [r for r, _ in pairs], [kind])
        for path, (r, cfg) in zip(paths, pairs, strict=True):
            out = (core_output(r, settings, cfg) if kind == "core" else
                   absorption_output(r, settings) if kind == "absorption" else
                   sparse_probing_output(r, settings))  # fmt: skip
            write_json(path, out)
            written.append(path)
    return written
