"""Attribution: the direct effect of every active latent, error node and token embedding on every
active latent and on the chosen logits, through the replacement model (`replacement`).

A target injects its direction where it reads the residual stream (a latent: its encoder column at
its layer's `mlp_in` and position, i.e. its pre-activation; a logit: the unembedding row less the
mean row, at the final norm's output, the last position) and one backward pass gives the gradient at
every MLP output and at the embeddings. The edge from a latent is its activation times its decoder
row dotted with the gradient at its layer's MLP output and position; from an error node, its error
vector; from a token, its embedding (Gemma's sqrt(d_model) scale included). Backward passes are
batched over `batch_size` targets at a time (`is_grads_batched`), and each target's pass stops at
its layer: a latent of layer l only sees MLP outputs of layers < l.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.circuits.graph import Graph, influence, normalized
from gemmascope.circuits.replacement import Replacement, prepare, run
from gemmascope.clt import CLT
from gemmascope.common.progress import progress_bar
from gemmascope.corpus import special_ids
from gemmascope.models import model_info
from gemmascope.sae import SAE


def attribute(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Tensor,
    transcoders: Sequence[SAE] | CLT,
    *,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    batch_size: int = 64,
    max_feature_nodes: int | None = None,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `prompt` through `transcoders` (one MLP transcoder per layer).

    Args:
        model, tokenizer: the language model and its tokenizer.
        prompt: text (tokenized with the tokenizer's BOS) or token ids `[T]`.
        transcoders: `mlp_in -> mlp_out` transcoders, one per layer, or a cross-layer transcoder
            over every layer (`io.load_transcoders` reads either).
        max_logits, logit_prob: the logit targets are the most likely next tokens at the last
            position, as few as hold `logit_prob` of the probability, at most `max_logits`.
        batch_size: targets per backward pass; memory grows with it (about batch x T x d x 4 bytes
            per layer).
        max_feature_nodes: compute incoming edges for at most this many latents, the most
            influential first (influence re-estimated from the rows so far every 4 batches, as
            circuit-tracer does); the others stay sources only. The adjacency is then
            `(max_feature_nodes + K) x (F + L T + T)`, so memory grows linearly with the prompt.
            None: every active latent.
        progress: show a progress bar over the targets.
    Returns:
        The unpruned `Graph` (prune it with `Graph.prune`, export it with `Graph.frontend_json`).
    """
    info = model_info(model)
    if not 1 <= max_logits or not 0 < logit_prob <= 1 or batch_size < 1:
        raise ValueError(
            f"need max_logits >= 1, 0 < logit_prob <= 1 and batch_size >= 1; got {max_logits}, "
            f"{logit_prob}, {batch_size}"
        )
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"`max_feature_nodes` must be >= 0 or None, got {max_feature_nodes}")
    ids = _ids(tokenizer, prompt)
    if len(ids) < 2:
        raise ValueError(f"the prompt is {len(ids)} token(s) long; a graph needs at least two")
    started = time.perf_counter()
    special = torch.isin(ids, torch.tensor(sorted(special_ids(tokenizer)), dtype=ids.dtype))
    rep = run(model, ids, prepare(transcoders, info.n_layers), special)
    feats = [torch.nonzero(z) for z in rep.acts]  # per layer (n_l, 2): position, latent
    features = torch.cat([torch.cat([torch.full((len(f), 1), layer), f], 1)
                          for layer, f in enumerate(feats)]).long()  # fmt: skip
    activations = torch.cat([z[f[:, 0], f[:, 1]] for z, f in zip(rep.acts, feats, strict=True)])
    logit_ids, logit_probs, logit_vecs = _logit_targets(model, rep.final[0, -1], max_logits,
                                                        logit_prob)  # fmt: skip
    F, T, L, K = len(features), len(ids), info.n_layers, len(logit_ids)
    capped = max_feature_nodes is not None and max_feature_nodes < F
    R = max_feature_nodes if capped else F  # latents with a row
    sources = [_Sources.of(rep, layer, f, T) for layer, f in enumerate(feats)]
    offsets = [0, *torch.tensor([len(f) for f in feats]).cumsum(0).tolist()]
    adjacency = torch.zeros(R + K, F + L * T + T)
    bar = progress_bar(R + K, unit="target", desc="attribute", enabled=progress)

    def latent_rows(which: Tensor) -> Tensor:
        """The rows of latents `which` (indices into `features`, one layer)."""
        layer = int(features[which[0], 0])
        tc = rep.dictionary.encoders[layer]
        pos, latent = features[which, 1], features[which, 2]
        inject = torch.zeros(len(which), 1, T, tc.cfg.d_in)
        inject[torch.arange(len(which)), 0, pos] = tc.W_enc.detach()[:, latent].T
        bar.update(len(which))
        return _rows(rep, rep.mlp_in[layer], inject, layer, sources, offsets)

    with bar:
        # the logits: every layer's sources
        for lo in range(0, K, batch_size):
            vecs = logit_vecs[lo : lo + batch_size]  # (B, d)
            inject = torch.zeros(len(vecs), 1, T, vecs.shape[1])
            inject[:, 0, T - 1] = vecs
            adjacency[R + lo : R + lo + len(vecs)] = _rows(rep, rep.final, inject, L, sources,
                                                           offsets)  # fmt: skip
            bar.update(len(vecs))
        if not capped:  # the latents of each layer: sources of earlier layers and the tokens
            for layer in range(L):
                for lo in range(offsets[layer], offsets[layer + 1], batch_size):
                    which = torch.arange(lo, min(lo + batch_size, offsets[layer + 1]))
                    adjacency[lo : lo + len(which)] = latent_rows(which)
            expanded = None
        else:
            expanded = _expand_by_influence(adjacency, R, F, L, logit_probs, features, batch_size,
                                            latent_rows)  # fmt: skip
            adjacency = torch.cat([adjacency[: len(expanded)], adjacency[R:]])
    tok = [tokenizer.decode([int(i)]) for i in ids]
    return Graph(
        prompt=prompt if isinstance(prompt, str) else tokenizer.decode(ids),
        ids=ids, tokens=tok, features=features, activations=activations.float(),
        logit_ids=logit_ids, logit_probs=logit_probs,
        logit_tokens=[tokenizer.decode([int(i)]) for i in logit_ids],
        adjacency=adjacency, n_layers=L, expanded=expanded,
        info={"seconds": round(time.perf_counter() - started, 2),
              "transcoder_width": rep.dictionary.width, "skip_connection": rep.dictionary.skip,
              "cross_layer": isinstance(transcoders, CLT), "max_feature_nodes": max_feature_nodes},
    )  # fmt: skip


def _expand_by_influence(adjacency: Tensor, R: int, F: int, L: int, logit_probs: Tensor,
                         features: Tensor, batch_size: int, latent_rows: Any) -> Tensor:  # fmt: skip
    """Fill rows `0..R-1` of `adjacency` (the logits' rows, `R..`, already there) with the latents
    of most influence on the logits through the rows so far, `4 * batch_size` at a time; returns
    which latents they are, in row order."""
    K = len(logit_probs)
    N = adjacency.shape[1] + K
    expanded = torch.zeros(0, dtype=torch.long)
    done = torch.zeros(F, dtype=torch.bool)
    while len(expanded) < R:
        rows = torch.cat([torch.arange(len(expanded)), torch.arange(R, R + K)])
        norm = normalized(adjacency[rows])
        row_nodes = torch.cat([expanded, torch.arange(N - K, N)])
        score = influence(norm, row_nodes, logit_probs.float(), N, L)[:F]
        score[done] = -1.0
        n = min(4 * batch_size, R - len(expanded), int((score > 0).sum()))
        if n == 0:  # nothing left that reaches the logits
            break
        pick = score.topk(n).indices
        pick = pick[torch.argsort(features[pick, 0] * F + pick)]  # by layer, for one pass each
        for layer in features[pick, 0].unique().tolist():
            group = pick[features[pick, 0] == layer]
            for lo in range(0, len(group), batch_size):
                which = group[lo : lo + batch_size]
                at = len(expanded)
                adjacency[at : at + len(which)] = latent_rows(which)
                expanded = torch.cat([expanded, which])
        done[pick] = True
    return expanded


@dataclass
class _Sources:
    """One layer's latents as sources: per layer they write, decoder rows times activations, grouped
    by position."""

    dec: dict[int, Tensor]  # layer j -> (n, d) activation * W_dec row into j, ordered by position
    spans: list[tuple[int, int, int]]  # (position, start, end) of each position's latents in `dec`

    @classmethod
    def of(cls, rep: Replacement, layer: int, f: Tensor, T: int) -> _Sources:
        a = rep.acts[layer][f[:, 0], f[:, 1]]  # (n,)
        dec = {j: w[f[:, 1]].float() * a[:, None] for j, w in rep.dictionary.writes[layer]}
        ends = torch.bincount(f[:, 0], minlength=T).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        spans = [
            (p, lo, hi) for p, (lo, hi) in enumerate(zip(starts, ends, strict=True)) if hi > lo
        ]
        return cls(dec, spans)


def _rows(
    rep: Replacement,
    out: Tensor,
    inject: Tensor,
    upto: int,
    sources: list[_Sources],
    offsets: list[int],
) -> Tensor:
    """Edges into `B` targets that inject `inject [B, 1, T, d]` at `out`, from the latents and errors
    of layers < `upto` and from the tokens: `[B, F + L T + T]`. A latent's edge sums over the MLP
    outputs it writes before `upto` (one, or a CLT's every later layer)."""
    B, _, T, _ = inject.shape
    L = len(rep.mlp_out)
    inputs = [*rep.mlp_out[:upto], rep.embed]
    grads = torch.autograd.grad(out, inputs, grad_outputs=inject.to(out.dtype), retain_graph=True,
                                is_grads_batched=True, allow_unused=True)  # fmt: skip
    F = offsets[-1]
    row = torch.zeros(B, F + L * T + T)
    for j in range(upto):
        if grads[j] is None:
            continue
        g = grads[j][:, 0].float()  # (B, T, d): the gradient at MLP j's output
        for i in range(j + 1):  # the latents of layer i that write MLP j read it
            src, at = sources[i], offsets[i]
            if j not in src.dec:
                continue
            for p, lo, hi in src.spans:
                row[:, at + lo : at + hi] += g[:, p] @ src.dec[j][lo:hi].T
        row[:, F + j * T : F + (j + 1) * T] = (g * rep.errors[j]).sum(-1)
    g = grads[-1]
    if g is not None:
        row[:, F + L * T :] = (g[:, 0].float() * rep.embed.detach()[0].float()).sum(-1)
    return row


def _logit_targets(
    model: nn.Module, final: Tensor, max_logits: int, share: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The likeliest next tokens holding `share` of the probability (at most `max_logits`), their
    probabilities, and their demeaned unembedding rows `[K, d]`."""
    head = model.get_output_embeddings().weight.detach().float()  # (V, d)
    with torch.no_grad():
        logits = final.detach().float() @ head.T  # (V,)
        cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = torch.softmax(logits, -1)
        top = probs.topk(min(max_logits, len(probs)))
        k = min(
            int(torch.searchsorted(top.values.cumsum(0), torch.tensor(share))) + 1, len(top.values)
        )
        ids, p = top.indices[:k], top.values[:k]
        return ids, p, head[ids] - head.mean(0)


def _ids(tokenizer: Any, prompt: str | Tensor) -> Tensor:
    if isinstance(prompt, Tensor):
        return prompt.long().flatten()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    bos = tokenizer.bos_token_id
    if bos is not None and (len(ids) == 0 or int(ids[0]) != bos):
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids.long()
