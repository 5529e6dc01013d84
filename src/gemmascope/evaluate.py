"""Evaluate SAEs on held-out tokens: reconstruction, sparsity, latent health and faithfulness.

Conventions (Gemma Scope's where it had one):

- Tokens are sequences packed from the corpus's `eval` split (`corpus.pack_sequences`). BOS, EOS and
  pad positions ("special") are left out of every metric: the SAEs never see them, and splices and
  ablations leave their activations clean, since Gemma Scope neither trained on nor spliced the BOS.
- Next-token cross-entropy is averaged over the positions whose activation was replaced (token not
  special) and whose label (the next token) exists and is not padding. The same positions are
  scored clean, spliced, zero- and mean-ablated, so the losses compare like with like.
- Logits are never materialised for a whole batch: the forward stops at the output embedding and
  cross-entropy runs through it `ce_chunk` positions at a time (memory about 2 x ce_chunk x vocab x 4
  bytes), with the model's final logit soft-capping where it has one.
- One clean forward per batch serves every SAE (sites sharing a layer are read once); spliced and
  ablated forwards resume from the spliced layer (`hooks.run_from`). Zero and mean ablation depend
  only on the site, so they run once per distinct (layer, site), whatever the number of SAEs there.
  The mean for mean ablation comes from a first pass that stops after the deepest site.

Metrics, over the n evaluated tokens x (d wide), reconstructions x_hat and residuals r = x - x_hat:
`mse` = sum ||r||^2 / (n d); `fvu` = sum ||r||^2 / sum ||x - mean x||^2; `explained_variance` =
1 - sum ||r - mean r||^2 / sum ||x - mean x||^2 (sklearn's; unlike 1 - fvu it forgives a constant
offset); `cosine` and `relative_norm` are token means of cos(x, x_hat) and ||x_hat|| / ||x||; `l0`
is the mean count of non-zero latents per token. `delta_lm_loss` = ce_spliced - ce_clean;
`frac_recovered` = (ce_zero - ce_spliced) / (ce_zero - ce_clean), `frac_recovered_mean` the same
with ce_mean. `dead` latents are never active, `dense` ones on more than 10% of tokens; the density
histogram counts live latents by log10 of the share of tokens they are active on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gemmascope.corpus import EVAL_FRACTION, Split, iter_documents, pack_sequences, special_ids
from gemmascope.hooks import collect, run_from, splice
from gemmascope.io.atomic import write_json
from gemmascope.models import ModelInfo, check_site, model_info
from gemmascope.sae import SAE

Key = tuple[int, str]
RESULTS_FORMAT = "gemmascope-eval"
RESULTS_VERSION = 1
DENSE_ABOVE = 0.1
"""A latent active on more than this share of tokens counts as dense."""
DENSITY_EDGES = [round(-10 + 0.25 * i, 2) for i in range(41)]
"""Bin edges of the log10 feature-density histogram, fixed so histograms of any run compare."""
_RESID = ("resid_pre", "resid_post")
L0_QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    saes: Sequence[SAE],
    *,
    corpus: str | Path = "default",
    split: Split = "eval",
    tokens: int = 100_000,
    context_size: int = 1024,
    batch_size: int = 8,
    text_column: str = "text",
    eval_fraction: float = EVAL_FRACTION,
    ablations: bool = True,
    ce_chunk: int = 512,
    model_name: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate SAEs on the held-out split of a corpus (see the module docstring for conventions).

    Args:
        model, tokenizer: the language model the SAEs read, and its tokenizer.
        saes: SAEs of any architecture with `cfg.layer` and `cfg.site` set (anything `gemmascope.load`
            returns); put them on the model's device for speed.
        corpus, split, text_column, eval_fraction: the text (see `corpus.iter_documents`).
        tokens: tokens to forward, BOS included; rounded up to whole sequences of `context_size`.
        context_size: tokens per sequence (Gemma Scope used 1024).
        batch_size: sequences per forward.
        ablations: also run zero- and mean-ablation (needed for the fraction of loss recovered).
        ce_chunk: positions per cross-entropy chunk through the output embedding.
        model_name: recorded in each result (default: the SAE's `cfg.model`).
        progress: show a progress bar counting forward passes (one clean, one per SAE and two per
            site for the ablations, per batch).
    Returns:
        One record per SAE, in order (see `evaluate_sequences`).
    """
    n_seqs = max(1, math.ceil(tokens / context_size))
    docs = iter_documents(corpus, split, text_column=text_column, eval_fraction=eval_fraction)
    sequences = []
    for seq in pack_sequences(docs, tokenizer, context_size):
        sequences.append(seq)
        if len(sequences) == n_seqs:
            break
    if len(sequences) < n_seqs:
        have = len(sequences) * context_size
        raise ValueError(
            f"the {split!r} split of corpus {str(corpus)!r} holds {have:,} tokens in sequences of "
            f"{context_size}, fewer than the {tokens:,} asked for; ask for at most {have:,} tokens "
            "or use a bigger corpus"
        )
    return evaluate_sequences(
        model, saes, sequences, skip_ids=special_ids(tokenizer), pad_id=tokenizer.pad_token_id,
        batch_size=batch_size, ablations=ablations, ce_chunk=ce_chunk, model_name=model_name,
        progress=progress,
    )  # fmt: skip


def evaluate_sequences(
    model: nn.Module,
    saes: Sequence[SAE],
    sequences: Iterable[np.ndarray | Tensor],
    *,
    skip_ids: Iterable[int] = (),
    pad_id: int | None = None,
    batch_size: int = 8,
    ablations: bool = True,
    ce_chunk: int = 512,
    model_name: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate SAEs on given token sequences of equal length; `evaluate` packs them from a corpus.

    Args:
        model: the language model.
        saes: the SAEs (see `evaluate`).
        sequences: token id arrays `[seq]`, all the same length.
        skip_ids: special token ids (BOS, EOS, pad), left out of every metric and never spliced.
        pad_id: padding id: padded positions are masked from attention and never scored as labels.
        batch_size, ablations, ce_chunk, model_name, progress: as in `evaluate`.
    Returns:
        One record per SAE: identity (`model`, `layer`, `site`, `width`, `architecture`, ...), token
        counts, `l0` (+ `l0_std`, `l0_quantiles`), `mse`, `fvu`, `explained_variance`, `cosine`,
        `relative_norm`, `ce_clean`, `ce_spliced`, `ce_zero`, `ce_mean`, `delta_lm_loss`,
        `frac_recovered`, `frac_recovered_mean`, `dead`, `dense`, `density_hist`. `source` and
        `sae_id` are None for the caller to fill.
    """
    info = model_info(model)
    keys = [_check_sae(info, i, sae) for i, sae in enumerate(saes)]
    if not keys:
        raise ValueError("`saes` is empty; pass at least one SAE to evaluate")
    skip = sorted(set(skip_ids))
    batches = _batches(sequences, batch_size)
    sites = sorted(set(keys))
    run = _Run(
        stats=[_Stats.new(sae.cfg.d_in, sae.cfg.d_sae) for sae in saes],
        ablated={(k, kind): 0.0 for k in sites for kind in ("zero", "mean")} if ablations else {},
    )
    # forwards per batch: the site means (ablations only), the clean one, one per SAE and ablation
    per_batch = 1 + len(saes) + len(run.ablated) + (1 if ablations else 0)
    bar = tqdm(total=len(batches) * per_batch, unit="fwd", desc="evaluate", disable=not progress)
    with torch.no_grad(), _eval_mode(saes), bar:
        means = _site_means(model, batches, sites, skip, pad_id, bar) if ablations else {}
        for ids in batches:
            _eval_batch(
                model, saes, keys, ids, means, run, bar, skip=skip, pad_id=pad_id, chunk=ce_chunk
            )
    return [
        _record(sae, key, st, run, model_name)
        for sae, key, st in zip(saes, keys, run.stats, strict=True)
    ]


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
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(labels), chunk):
        logits = F.linear(hidden[i : i + chunk], head.weight, head.bias).float()  # (c, vocab)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out[i : i + chunk] = F.cross_entropy(logits, labels[i : i + chunk], reduction="none")
    return out


# ---------------------------------------------------------------- running sums
@dataclass
class _Stats:
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
    ce: float = 0.0

    @classmethod
    def new(cls, d: int, d_sae: int) -> _Stats:
        z = torch.zeros(d, dtype=torch.float64)
        return cls(sum_x=z, sum_r=z.clone(), fired=torch.zeros(d_sae, dtype=torch.int64))


@dataclass
class _Run:
    """Everything accumulated over the batches, shared by every SAE."""

    stats: list[_Stats]
    ablated: dict[tuple[Key, str], float]  # ((layer, site), "zero" | "mean") -> sum of losses
    ce_clean: float = 0.0
    loss_tokens: int = 0


def _accumulate(st: _Stats, x: Tensor, z: Tensor, x_hat: Tensor) -> None:
    """Add one batch of `[n, d]` activations, `[n, d_sae]` latents and reconstructions."""
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


# ---------------------------------------------------------------- the passes
def _eval_batch(
    model: nn.Module,
    saes: Sequence[SAE],
    keys: list[Key],
    ids: Tensor,
    means: dict[Key, Tensor],
    run: _Run,
    bar: tqdm,
    *,
    skip: list[int],
    pad_id: int | None,
    chunk: int,
) -> None:
    """One clean forward, then per SAE a spliced forward from its layer, then the ablations."""
    ids, attn, mask = _masks(model, ids, skip, pad_id)
    scored = mask[:, :-1] & (ids[:, 1:] != (-1 if pad_id is None else pad_id))  # (B, T-1)
    labels = ids[:, 1:][scored]  # (n_scored,)

    def loss(final: Tensor) -> float:
        return float(token_losses(model, final[:, :-1][scored], labels, chunk=chunk).double().sum())

    resumed = {(layer, "resid_pre") for layer, site in keys if site not in _RESID}
    needed = sorted(set(keys) | resumed)
    clean, final = _clean_forward(model, ids, needed, attn)
    run.ce_clean += loss(final)
    run.loss_tokens += len(labels)
    bar.update()
    for sae, key, st in zip(saes, keys, run.stats, strict=True):
        x = clean[key][mask]  # (n, W)
        z = sae.encode(x)  # (n, d_sae)
        x_hat = sae.decode(z).to(x.device)  # (n, W)
        _accumulate(st, x, z, x_hat)
        st.ce += loss(_resume(model, key, _replaced(clean[key], mask, x_hat), clean, attn))
        bar.update()
    for key, kind in run.ablated:
        fill = torch.zeros(()) if kind == "zero" else means[key]
        value = _replaced(clean[key], mask, fill)
        run.ablated[key, kind] += loss(_resume(model, key, value, clean, attn))
        bar.update()


def _masks(
    model: nn.Module, ids: Tensor, skip: list[int], pad_id: int | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Ids on the model's device, the attention mask (None without padding) and the `[B, T]` mask
    of positions the SAEs see (not special)."""
    ids = ids.to(next(model.parameters()).device)  # (B, T)
    attn = (ids != pad_id).long() if pad_id is not None and bool((ids == pad_id).any()) else None
    special = torch.tensor(skip, dtype=ids.dtype, device=ids.device)
    return ids, attn, ~torch.isin(ids, special)


def _replaced(clean: Tensor, mask: Tensor, new: Tensor) -> Tensor:
    """A copy of `[B, T, W]` activations with the masked positions set to `new` (`[n, W]` or `[W]`)."""
    value = clean.clone()
    value[mask] = new.to(value.device, value.dtype)
    return value


def _clean_forward(
    model: nn.Module, ids: Tensor, keys: list[Key], attn: Tensor | None
) -> tuple[dict[Key, Tensor], Tensor]:
    """Activations at `keys` and the final hidden states `[B, T, d_model]` of one plain forward."""
    seen: dict[Key, Tensor] = {}

    def recorder(key: Key) -> Callable[[Tensor], Tensor]:
        def record(value: Tensor) -> Tensor:
            seen[key] = value
            return value

        return record

    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(splice(model, *key, recorder(key)))
        final = _until_head(
            model, lambda: model(input_ids=ids, attention_mask=attn, use_cache=False)
        )
    return seen, final


def _resume(
    model: nn.Module, key: Key, value: Tensor, clean: dict[Key, Tensor], attn: Tensor | None
) -> Tensor:
    """Final hidden states when `value` stands at `key`, computed from that layer on."""
    layer, site = key
    if site == "resid_post":
        return _until_head(model, lambda: run_from(model, layer + 1, value, attention_mask=attn))
    if site == "resid_pre":
        return _until_head(model, lambda: run_from(model, layer, value, attention_mask=attn))
    start = clean[layer, "resid_pre"]
    with splice(model, layer, site, lambda _: value):
        return _until_head(model, lambda: run_from(model, layer, start, attention_mask=attn))


class _AtHead(Exception):
    """Raised by the output embedding's pre-hook to hand back its input and skip the logits."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _until_head(model: nn.Module, forward: Callable[[], Any]) -> Tensor:
    """Run `forward` up to the output embedding and return what would enter it `[B, T, d_model]`."""

    def stop(_: nn.Module, args: tuple[Any, ...]) -> None:
        raise _AtHead(args[0])

    handle = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        forward()
    except _AtHead as at:
        return at.hidden
    finally:
        handle.remove()
    raise RuntimeError(
        "the forward never reached the output embedding; is the model's code patched?"
    )


def _site_means(
    model: nn.Module,
    batches: list[Tensor],
    sites: list[Key],
    skip: list[int],
    pad_id: int | None,
    bar: tqdm,
) -> dict[Key, Tensor]:
    """Mean activation `[W]` of each site over the evaluated tokens (forwards stop at the deepest)."""
    sums: dict[Key, Tensor] = {}
    n = 0
    for batch in batches:
        ids, attn, mask = _masks(model, batch, skip, pad_id)
        acts = collect(model, ids, sites, attention_mask=attn)
        for key in sites:
            part = acts[key][mask].double().sum(0)  # (W,)
            sums[key] = sums[key] + part if key in sums else part
        n += int(mask.sum())
        bar.update()
    if n == 0:
        raise ValueError(
            "every evaluated position is a special token (BOS/EOS/pad); nothing to score"
        )
    return {key: (s / n).float() for key, s in sums.items()}


# ---------------------------------------------------------------- checks, inputs, records
def _check_sae(info: ModelInfo, index: int, sae: SAE) -> Key:
    """The SAE's (layer, site), after checking that it can be evaluated on this model."""
    c = sae.cfg
    name = f"saes[{index}] {sae!r}"
    if c.layer is None or c.site is None:
        raise ValueError(
            f"{name} does not say which layer and site it reads (cfg.layer={c.layer}, "
            f"cfg.site={c.site}); set them, or load it from a folder that records them"
        )
    if c.extra.get("target_site"):
        raise ValueError(
            f"{name} is a transcoder ({c.site} -> {c.extra['target_site']}); evaluate() scores SAEs "
            "that reconstruct their own input, so leave transcoders out"
        )
    check_site(info, c.layer, c.site)
    width = info.site_width(c.site)
    if c.d_in != width:
        raise ValueError(
            f"{name} reads d_in={c.d_in} but layer {c.layer} {c.site} of this model is {width} wide; "
            f"evaluate it on the model it was trained on ({c.model or 'see cfg.model'})"
        )
    return c.layer, c.site


def _batches(sequences: Iterable[np.ndarray | Tensor], batch_size: int) -> list[Tensor]:
    seqs = [torch.as_tensor(np.asarray(s)).long() for s in sequences]
    if not seqs:
        raise ValueError("no sequences to evaluate on; pass at least one")
    lengths = sorted({len(s) for s in seqs})
    if len(lengths) > 1 or lengths[0] < 2:
        raise ValueError(
            f"sequences must share one length of at least 2, got lengths {lengths[:5]}"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}")
    return [torch.stack(seqs[i : i + batch_size]) for i in range(0, len(seqs), batch_size)]


@contextlib.contextmanager
def _eval_mode(saes: Sequence[SAE]) -> Iterator[None]:
    """Eval mode while scoring (batchtopk then encodes per token), restored afterwards."""
    was = [sae.training for sae in saes]
    try:
        for sae in saes:
            sae.eval()
        yield
    finally:
        for sae, mode in zip(saes, was, strict=True):
            sae.train(mode)


def _record(sae: SAE, key: Key, st: _Stats, run: _Run, model_name: str | None) -> dict[str, Any]:
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
        "clean": run.ce_clean,
        "spliced": st.ce,
        **{k: run.ablated.get((key, k)) for k in ("zero", "mean")},
    }
    ce = {k: None if v is None else v / run.loss_tokens for k, v in ce.items()}
    return {
        "source": None, "sae_id": None, "model": model_name or c.model, "layer": c.layer,
        "site": c.site, "width": c.d_sae, "d_in": d, "architecture": c.architecture, "k": c.k,
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
    }  # fmt: skip


def _recovered(ablated: float | None, spliced: float, clean: float) -> float | None:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); None without the ablation."""
    if ablated is None or ablated == clean:
        return None
    return (ablated - spliced) / (ablated - clean)


# ---------------------------------------------------------------- sources and result files
def expand_sources(
    sources: Sequence[str], sae_ids: Sequence[str] = ()
) -> list[tuple[str, str | None]]:
    """(source, sae_id) pairs to load: each `sae_id` of each source, or every SAE of a local folder.

    A hub repo holding several SAEs needs `sae_ids` (downloading a whole Gemma Scope repo is never
    what one wants).
    """
    from gemmascope.io import list_sae_ids

    pairs: list[tuple[str, str | None]] = []
    for source in sources:
        if sae_ids:
            pairs += [(source, sae_id) for sae_id in sae_ids]
            continue
        path = Path(source)
        if path.is_file():
            pairs.append((source, None))
            continue
        ids = list_sae_ids(source)
        if len(ids) > 1 and not path.is_dir():
            raise ValueError(
                f"{source}: the repo holds {len(ids)} SAEs; pick some with --sae-id, e.g. {ids[:3]}"
            )
        pairs += [(source, None if sae_id == "." else sae_id) for sae_id in ids]
    return pairs


def write_results(
    path: str | Path, records: list[dict[str, Any]], settings: dict[str, Any]
) -> None:
    """Write evaluation records atomically as `{"format", "format_version", "settings", "results"}`."""
    from gemmascope import __version__

    write_json(path, {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                      "gemmascope_version": __version__, "settings": settings, "results": records})  # fmt: skip


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a file written by `write_results` (`gemmascope eval --out`)."""
    from gemmascope.io._common import read_json

    data = read_json(Path(path))
    if data.get("format") != RESULTS_FORMAT or not isinstance(data.get("results"), list):
        raise ValueError(
            f'{path}: not a gemmascope evaluation file (expected "format": "{RESULTS_FORMAT}" and '
            "a `results` list); write one with `gemmascope eval ... --out FILE`"
        )
    if data.get("format_version") != RESULTS_VERSION:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')!r}, this gemmascope reads "
            f"{RESULTS_VERSION}; upgrade gemmascope"
        )
    return data["results"]
