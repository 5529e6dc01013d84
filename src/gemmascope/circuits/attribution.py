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

from gemmascope.circuits.graph import Graph
from gemmascope.circuits.replacement import Replacement, prepare, run
from gemmascope.common.progress import progress_bar
from gemmascope.corpus import special_ids
from gemmascope.models import model_info
from gemmascope.sae import SAE


def attribute(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Tensor,
    transcoders: Sequence[SAE],
    *,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    batch_size: int = 64,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `prompt` through `transcoders` (one MLP transcoder per layer).

    Args:
        model, tokenizer: the language model and its tokenizer.
        prompt: text (tokenized with the tokenizer's BOS) or token ids `[T]`.
        transcoders: `mlp_in -> mlp_out` transcoders, one per layer (`io.load_transcoders`).
        max_logits, logit_prob: the logit targets are the most likely next tokens at the last
            position, as few as hold `logit_prob` of the probability, at most `max_logits`.
        batch_size: targets per backward pass; memory grows with it (about batch x T x d x 4 bytes
            per layer).
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
    sources = [_Sources.of(rep, layer, f, T) for layer, f in enumerate(feats)]
    adjacency = torch.zeros(F + K, F + L * T + T)
    offsets = [0, *torch.tensor([len(f) for f in feats]).cumsum(0).tolist()]
    bar = progress_bar(F + K, unit="target", desc="attribute", enabled=progress)
    with bar:
        # the logits: every layer's sources
        for lo in range(0, K, batch_size):
            vecs = logit_vecs[lo : lo + batch_size]  # (B, d)
            inject = torch.zeros(len(vecs), 1, T, vecs.shape[1])
            inject[:, 0, T - 1] = vecs
            rows = _rows(rep, rep.final, inject, L, sources, offsets)
            adjacency[F + lo : F + lo + len(vecs)] = rows
            bar.update(len(vecs))
        # the latents of each layer: sources of earlier layers and the tokens
        for layer in range(L):
            tc, f = rep.transcoders[layer], feats[layer]
            for lo in range(0, len(f), batch_size):
                part = f[lo : lo + batch_size]
                inject = torch.zeros(len(part), 1, T, tc.cfg.d_in)
                inject[torch.arange(len(part)), 0, part[:, 0]] = tc.W_enc.detach()[:, part[:, 1]].T
                row = offsets[layer] + lo
                adjacency[row : row + len(part)] = _rows(rep, rep.mlp_in[layer], inject, layer,
                                                         sources, offsets)  # fmt: skip
                bar.update(len(part))
    tok = [tokenizer.decode([int(i)]) for i in ids]
    return Graph(
        prompt=prompt if isinstance(prompt, str) else tokenizer.decode(ids),
        ids=ids, tokens=tok, features=features, activations=activations.float(),
        logit_ids=logit_ids, logit_probs=logit_probs,
        logit_tokens=[tokenizer.decode([int(i)]) for i in logit_ids],
        adjacency=adjacency, n_layers=L,
        info={"seconds": round(time.perf_counter() - started, 2),
              "transcoder_width": int(rep.transcoders[0].cfg.d_sae),
              "skip_connection": rep.transcoders[0].W_skip is not None},
    )  # fmt: skip


@dataclass
class _Sources:
    """One layer's latents as sources: decoder rows times activations, grouped by position."""

    dec: Tensor  # (n, d) activation * W_dec row of each active latent, ordered by position
    spans: list[tuple[int, int, int]]  # (position, start, end) of each position's latents in `dec`

    @classmethod
    def of(cls, rep: Replacement, layer: int, f: Tensor, T: int) -> _Sources:
        a = rep.acts[layer][f[:, 0], f[:, 1]]  # (n,)
        dec = rep.transcoders[layer].W_dec.detach()[f[:, 1]].float() * a[:, None]
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
    of layers < `upto` and from the tokens: `[B, F + L T + T]`."""
    B, _, T, _ = inject.shape
    L = len(rep.mlp_out)
    inputs = [*rep.mlp_out[:upto], rep.embed]
    grads = torch.autograd.grad(out, inputs, grad_outputs=inject.to(out.dtype), retain_graph=True,
                                is_grads_batched=True, allow_unused=True)  # fmt: skip
    F = offsets[-1]
    row = torch.zeros(B, F + L * T + T)
    for layer in range(upto):
        if grads[layer] is None:
            continue
        g = grads[layer][:, 0].float()  # (B, T, d)
        src, at = sources[layer], offsets[layer]
        for p, lo, hi in src.spans:  # latents at position p read the gradient there
            row[:, at + lo : at + hi] = g[:, p] @ src.dec[lo:hi].T
        row[:, F + layer * T : F + (layer + 1) * T] = (g * rep.errors[layer]).sum(-1)
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
