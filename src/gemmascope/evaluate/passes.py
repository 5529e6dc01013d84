"""The forwards of an evaluation: one clean pass per batch serving every SAE, a spliced pass per SAE
resumed from its layer, and the zero/mean ablations once per site."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gemmascope.clt import CLT
from gemmascope.common.progress import progress_bar
from gemmascope.corpus import iter_documents, pack_sequences, special_ids
from gemmascope.evaluate.config import EvalConfig
from gemmascope.evaluate.extras import extra_evals
from gemmascope.evaluate.metrics import Sums, Totals, accumulate, logit_scores, record
from gemmascope.evaluate.saebench import Scores
from gemmascope.hooks import collect, run_from, run_until_head, splice
from gemmascope.models import SITES, ModelInfo, SiteKey, check_forward, check_site, model_info
from gemmascope.sae import SAE

_RESID = ("resid_pre", "resid_post")


@dataclasses.dataclass
class _CLTLayer:
    """Layer `i` of a cross-layer transcoder, scored as a transcoder of that layer whose output
    also holds what every earlier layer's latents write there."""

    clt: CLT
    i: int

    @property
    def cfg(self):  # noqa: ANN201 - an SAEConfig of this layer alone, for the record
        c = self.clt.cfg
        extra = {**c.extra, "clt": {"layers": list(self.clt.layers), "layer_index": self.i}}
        return dataclasses.replace(c, n_layers=None, layer=c.layer + self.i, extra=extra)

    def predict(self, clean: dict[SiteKey, Tensor], mask: Tensor,
                cache: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:  # fmt: skip
        """This layer's latents `[n, F]` and the CLT's output at its target `[n, d]`; the CLT runs
        once per batch on every layer (`cache`)."""
        clt = self.clt
        if id(clt) not in cache:
            x = torch.stack([clean[(layer, clt.cfg.site)][mask] for layer in clt.layers], -2)
            z = clt.encode(x)  # (n, L, F)
            cache[id(clt)] = z, clt.decode(z) + clt.skip(x)  # (n, L, d)
        z, y_hat = cache[id(clt)]
        return z[:, self.i], y_hat[:, self.i]

    def encode(self, x: Tensor) -> Tensor:
        """This layer's latents from its own input alone (earlier layers only add to its output)."""
        return self.clt.encode_layer(x, self.i)


def per_layer(saes: Sequence[SAE | CLT]) -> list[SAE | _CLTLayer]:
    """The SAEs to score, each CLT as one item per layer."""
    return [
        item for s in saes
        for item in ([_CLTLayer(s, i) for i in range(s.n_layers)] if isinstance(s, CLT) else [s])
    ]  # fmt: skip


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    saes: Sequence[SAE | CLT],
    cfg: EvalConfig | None = None,
    *,
    progress: bool = True,
    details: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate SAEs on the held-out split of a corpus (see the package docstring for conventions).

    Args:
        model, tokenizer: the language model the SAEs read, and its tokenizer.
        saes: SAEs of any architecture with `cfg.layer` and `cfg.site` set (anything `gemmascope.load`
            returns); put them on the model's device for speed. A cross-layer transcoder is scored
            layer by layer: its output at each layer replaces that layer's MLP.
        cfg: the text and the passes (see `EvalConfig`); default `EvalConfig()`.
        progress: show a progress bar counting forward passes (one clean, one per SAE and three per
            site for the ablations, per batch).
        details: add SAEBench's per-latent details to each record (`saebench_details`).
        **options: `EvalConfig` fields that replace those of `cfg`, e.g. `tokens=10_000`.
    Returns:
        One record per SAE (per layer of a CLT), in order (see `evaluate_sequences`).
    """
    cfg = dataclasses.replace(cfg or EvalConfig(), **options)
    check_forward(model, cfg.batch_size, cfg.context_size)
    n_seqs = max(1, math.ceil(cfg.tokens / cfg.context_size))
    docs = iter_documents(cfg.corpus, cfg.split, text_column=cfg.text_column,
                          eval_fraction=cfg.eval_fraction)  # fmt: skip
    sequences = []
    for seq in pack_sequences(docs, tokenizer, cfg.context_size):
        sequences.append(seq)
        if len(sequences) == n_seqs:
            break
    if len(sequences) < n_seqs:
        have = len(sequences) * cfg.context_size
        raise ValueError(
            f"the {cfg.split!r} split of corpus {str(cfg.corpus)!r} holds {have:,} tokens in "
            f"sequences of {cfg.context_size}, fewer than the {cfg.tokens:,} asked for; ask for at "
            f"most {have:,} tokens or use a bigger corpus"
        )
    with extra_evals(model, tokenizer, cfg, progress) as run_extras:  # bad settings refused here
        records = evaluate_sequences(
            model, saes, sequences, skip_ids=special_ids(tokenizer),
            pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, ablations=cfg.ablations,
            ce_chunk=cfg.ce_chunk, model_name=cfg.model, progress=progress, details=details,
        )  # fmt: skip
        with _eval_mode(saes):
            for name, found in run_extras(per_layer(saes), sequences):
                for r, result in zip(records, found, strict=True):
                    if result is not None:
                        r["saebench"][name] = result
    return records


def evaluate_sequences(
    model: nn.Module,
    saes: Sequence[SAE | CLT],
    sequences: Iterable[np.ndarray | Tensor],
    *,
    skip_ids: Iterable[int] = (),
    pad_id: int | None = None,
    batch_size: int = 8,
    ablations: bool = True,
    ce_chunk: int = 512,
    model_name: str | None = None,
    progress: bool = True,
    details: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate SAEs on given token sequences of equal length; `evaluate` packs them from a corpus.

    Args:
        model: the language model.
        saes: the SAEs (see `evaluate`).
        sequences: token id arrays `[seq]`, all the same length.
        skip_ids: special token ids (BOS, EOS, pad), left out of every metric and never spliced.
        pad_id: padding id: padded positions are masked from attention and never scored as labels.
        batch_size, ablations, ce_chunk: as in `EvalConfig`.
        model_name: recorded in each result (default: the SAE config's `model`).
        progress, details: as in `evaluate`.
    Returns:
        One record per SAE: identity (`model`, `layer`, `site`, `width`, `architecture`, ...), token
        counts, `l0` (+ `l0_std`, `l0_quantiles`), `mse`, `fvu`, `explained_variance`, `cosine`,
        `relative_norm`, `ce_clean`, `ce_spliced`, `ce_zero`, `ce_mean`, `delta_lm_loss`,
        `frac_recovered`, `frac_recovered_mean`, `dead`, `dense`, `density_hist`, and `saebench`:
        `{"core": SAEBench's core metrics by category}` (see `gemmascope.evaluate.saebench`).
        `source` and `sae_id` are None for the caller to fill.
    """
    info = model_info(model)
    saes = per_layer(saes)
    keys = [_check_sae(info, i, sae) for i, sae in enumerate(saes)]
    if not keys:
        raise ValueError("`saes` is empty; pass at least one SAE to evaluate")
    skip = sorted(set(skip_ids))
    batches = _batches(sequences, batch_size)
    sites = sorted({target for _, target in keys})  # where SAEs write: spliced and ablated
    kinds = ("zero", "mean", "zero_all") if ablations else ()
    run = Totals(
        stats=[Sums.new(sae) for sae in saes],
        ablated={(k, kind): Scores() for k in sites for kind in kinds},
    )
    # forwards per batch: the site means (ablations only), the clean one, one per SAE and ablation
    per_batch = 1 + len(saes) + len(run.ablated) + (1 if ablations else 0)
    bar = progress_bar(len(batches) * per_batch, unit="fwd", desc="evaluate", enabled=progress)
    with torch.no_grad(), _eval_mode([s.clt if isinstance(s, _CLTLayer) else s for s in saes]), bar:
        means = _site_means(model, batches, sites, skip, pad_id, bar) if ablations else {}
        for ids in batches:
            _eval_batch(
                model, saes, keys, ids, means, run, bar, skip=skip, pad_id=pad_id, chunk=ce_chunk
            )
    return [
        record(sae, target, st, run, model_name, details=details)
        for sae, (_, target), st in zip(saes, keys, run.stats, strict=True)
    ]


# ---------------------------------------------------------------- the passes
def _eval_batch(
    model: nn.Module,
    saes: Sequence[SAE | _CLTLayer],
    keys: list[tuple[SiteKey, SiteKey]],
    ids: Tensor,
    means: dict[SiteKey, Tensor],
    run: Totals,
    bar: Any,
    *,
    skip: list[int],
    pad_id: int | None,
    chunk: int,
) -> None:
    """One clean forward, then per SAE a spliced forward from its layer, then the ablations.

    A transcoder's output replaces its target site (the MLP's output, for `mlp_in -> mlp_out`), and
    its FVU is measured against the target."""
    ids, attn, mask = _masks(model, ids, skip, pad_id)
    labels = torch.full_like(ids, -1)
    labels[:, :-1] = ids[:, 1:]  # (B, T): the next token, -1 at the end
    ours = (labels >= 0) & (labels != (-1 if pad_id is None else pad_id))  # (B, T)
    labels, ours = labels[mask], ours[mask]  # (n,)
    seq = mask.nonzero()[:, 0]  # (n,) the sequence of each kept position
    ends = {key for pair in keys for key in pair}
    ends |= {
        (layer, s.clt.cfg.site) for s in saes if isinstance(s, _CLTLayer) for layer in s.clt.layers
    }
    resumed = {(layer, "resid_pre") for layer, site in ends if site not in _RESID}
    clean, final = _clean_forward(model, ids, sorted(ends | resumed), attn)
    bar.update()
    finals = []  # (n, d_model) final hidden states of each spliced, then each ablated forward
    encoded: dict[int, tuple[Tensor, Tensor]] = {}  # each CLT's latents and outputs, once
    for sae, (source, target), st in zip(saes, keys, run.stats, strict=True):
        x = clean[source][mask]  # (n, W)
        if isinstance(sae, _CLTLayer):
            z, y_hat = sae.predict(clean, mask, encoded)
        else:
            z = sae.encode(x)  # (n, d_sae)
            y_hat = sae.decode(z) if sae.W_skip is None else sae.decode(z) + sae.skip(x)
        y_hat = y_hat.to(x.device)  # (n, W)
        accumulate(st, clean[target][mask], z, y_hat, seq, len(ids))  # (n, W) each
        value = _replaced(clean[target], mask, y_hat)
        finals.append(_resume(model, target, value, clean, attn)[mask])
        bar.update()
    for key, kind in run.ablated:
        if kind == "zero_all":  # SAEBench's: special positions too
            value = torch.zeros_like(clean[key])
        else:
            value = _replaced(clean[key], mask, torch.zeros(()) if kind == "zero" else means[key])
        finals.append(_resume(model, key, value, clean, attn)[mask])
        bar.update()
    scores = logit_scores(model, final[mask], finals, labels, ours, chunk=chunk)
    run.clean.add(scores[0])
    run.loss_tokens += int(ours.sum())
    run.sb_ce_tokens += int((labels >= 0).sum())
    run.sb_kl_tokens += len(labels)
    run.tokens += ids.numel()
    sums = [st.scores for st in run.stats] + list(run.ablated.values())
    for score, total in zip(scores[1:], sums, strict=True):
        total.add(score)


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
    model: nn.Module, ids: Tensor, keys: list[SiteKey], attn: Tensor | None
) -> tuple[dict[SiteKey, Tensor], Tensor]:
    """Activations at `keys` and the final hidden states `[B, T, d_model]` of one plain forward."""
    seen: dict[SiteKey, Tensor] = {}

    def recorder(key: SiteKey) -> Callable[[Tensor], Tensor]:
        def record(value: Tensor) -> Tensor:
            seen[key] = value
            return value

        return record

    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(splice(model, *key, recorder(key)))
        final = run_until_head(
            model, lambda: model(input_ids=ids, attention_mask=attn, use_cache=False)
        )
    return seen, final


def _resume(
    model: nn.Module, key: SiteKey, value: Tensor, clean: dict[SiteKey, Tensor], attn: Tensor | None
) -> Tensor:
    """Final hidden states when `value` stands at `key`, computed from that layer on."""
    layer, site = key
    if site == "resid_post":
        return run_until_head(model, lambda: run_from(model, layer + 1, value, attention_mask=attn))
    if site == "resid_pre":
        return run_until_head(model, lambda: run_from(model, layer, value, attention_mask=attn))
    start = clean[layer, "resid_pre"]
    with splice(model, layer, site, lambda _: value):
        return run_until_head(model, lambda: run_from(model, layer, start, attention_mask=attn))


def _site_means(
    model: nn.Module,
    batches: list[Tensor],
    sites: list[SiteKey],
    skip: list[int],
    pad_id: int | None,
    bar: Any,
) -> dict[SiteKey, Tensor]:
    """Mean activation `[W]` of each site over the evaluated tokens (forwards stop at the deepest)."""
    sums: dict[SiteKey, Tensor] = {}
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
def _check_sae(info: ModelInfo, index: int, sae: SAE | _CLTLayer) -> tuple[SiteKey, SiteKey]:
    """Where the SAE reads and writes, `(layer, site)` each, after checking that it can be
    evaluated on this model."""
    c = sae.cfg
    name = f"saes[{index}] {sae!r}"
    if c.layer is None or c.site is None:
        raise ValueError(
            f"{name} does not say which layer and site it reads (cfg.layer={c.layer}, "
            f"cfg.site={c.site}); set them, or load it from a folder that records them"
        )
    for site in (c.site, c.target_site or c.site):
        check_site(info, c.layer, site)
        width = info.site_width(site)
        if c.d_in != width:
            raise ValueError(
                f"{name} has d_in={c.d_in} but layer {c.layer} {site} of this model is {width} "
                f"wide; evaluate it on the model it was trained on ({c.model or 'see cfg.model'})"
            )
    if c.target_site and SITES.index(c.target_site) <= SITES.index(c.site):
        raise ValueError(f"{name}: its target site {c.target_site} comes before what it reads")
    return (c.layer, c.site), (c.layer, c.target_site or c.site)


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
