"""Evaluation cost against the forwards it cannot avoid: how much do SAEs, metrics and plumbing add?

All on the same model and the same packed eval sequences of the default corpus, in this process:

- clean: one forward over the N tokens, stopped at the output embedding, then the chunked
  cross-entropy through it (what `evaluate` does for the clean loss);
- spliced: for each of the K SAE layers, the forward resumed after that layer (`hooks.run_from`)
  plus the chunked cross-entropy, i.e. the least a spliced loss can cost;
- evaluate: `evaluate_sequences` of K random JumpReLU SAEs, one per layer, without and then with
  the ablations (zero and mean, ours, and SAEBench's zero at every position: 3 resumed forwards per
  distinct site and a first pass for the means, so with every SAE at its own site they roughly
  quadruple the spliced work); both include SAEBench's core metrics, KL against the clean run
  included, computed on the same logits;
- sparse probing: SAEBench's probes for the same K SAEs on the two default tasks, against its floor,
  one forward over the same windows stopped after the deepest layer;
- absorption: SAEBench's first-letter absorption for the same K SAEs, against one forward over the
  same prompts stopped after the deepest layer (the rest is the probes, trained on the CPU);
- autointerp contexts: the pass that gathers every SAE's top, sampled and random contexts, against
  one forward over the same sequences stopped after the deepest layer (the LLM's answers come on
  top, at the endpoint's speed).

`--evals` picks the sections (default all).

The goal is evaluate (no ablations) / (clean + K spliced) <= 1.3.

    python bench/evaluate.py --tokens 1024 --context-size 256 --layers 3,9,15
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gemmascope.corpus import iter_documents, pack_sequences, special_ids
from gemmascope.evaluate import EvalConfig, evaluate_sequences, token_losses
from gemmascope.evaluate.absorption import absorption, prompts_per_batch
from gemmascope.evaluate.autointerp import collect_contexts
from gemmascope.evaluate.passes import _clean_forward, _resume
from gemmascope.evaluate.probing import build_tasks, sparse_probing
from gemmascope.evaluate.spelling import padded, spelling_prompts
from gemmascope.hooks import collect
from gemmascope.models import load_model, model_info, parse_layers
from gemmascope.sae import SAE, SAEConfig


def random_sae(d_in: int, width: int, layer: int, site: str, seed: int) -> SAE:
    """A JumpReLU SAE with random weights of a sensible scale (its cost, not its quality, matters)."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("jumprelu", d_in=d_in, d_sae=width, layer=layer, site=site))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, width, generator=g) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T / 10)
        sae.threshold.fill_(0.5)
    return sae.eval()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def clean_pass(model: Any, batches: list[Tensor], skip: list[int]) -> None:
    for ids in batches:
        _, final = _clean_forward(model, ids, [], None)
        scored = ~torch.isin(ids[:, :-1], torch.tensor(skip))
        token_losses(model, final[:, :-1][scored], ids[:, 1:][scored])


def spliced_pass(
    model: Any, batches: list[Tensor], skip: list[int], key: tuple[int, str], inputs: list[Tensor]
) -> None:
    for ids, value in zip(batches, inputs, strict=True):
        final = _resume(model, key, value, {}, None)
        scored = ~torch.isin(ids[:, :-1], torch.tensor(skip))
        token_losses(model, final[:, :-1][scored], ids[:, 1:][scored])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", default="3,9,15")
    p.add_argument("--site", default="resid_post")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--probe-train", type=int, default=1000)
    p.add_argument("--probe-test", type=int, default=250)
    p.add_argument("--absorption-words", type=int, default=20_000)
    p.add_argument("--evals", default="core,sparse_probing,absorption,autointerp")
    args = p.parse_args()
    evals = set(args.evals.split(","))

    model, tok = load_model(args.model, device=args.device)
    info = model_info(model)
    layers = parse_layers(args.layers, info.n_layers)
    n_seqs = -(-args.tokens // args.context_size)
    docs = iter_documents("default", "eval")
    seqs = list(itertools.islice(pack_sequences(docs, tok, args.context_size), n_seqs))
    batches = [torch.from_numpy(np.stack(seqs[i : i + args.batch_size])).long().to(args.device)
               for i in range(0, len(seqs), args.batch_size)]  # fmt: skip
    skip = special_ids(tok)
    width = info.site_width(args.site)
    saes = [random_sae(width, args.width, layer, args.site, i).to(args.device)
            for i, layer in enumerate(layers)]  # fmt: skip
    print(f"{args.model} on {args.device}: {len(seqs)} x {args.context_size} tokens, "
          f"{len(saes)} SAEs of width {args.width} at {args.site} of layers {layers}")  # fmt: skip

    deepest = [(max(layers), args.site)]
    if "core" in evals:
        with torch.no_grad():
            clean_pass(model, batches[:1], skip)  # warm-up, not timed
            t_clean = timed(clean_pass, model, batches, skip)
            t_spliced = []
            for layer in layers:
                key = (layer, args.site)
                inputs = [collect(model, ids, [key])[key] for ids in batches]
                t_spliced.append(timed(spliced_pass, model, batches, skip, key, inputs))
            t_means = timed(
                lambda: [collect(model, ids, [(max(layers), args.site)]) for ids in batches]
            )
        run = dict(skip_ids=skip, pad_id=tok.pad_token_id, batch_size=args.batch_size)
        t_eval = timed(evaluate_sequences, model, saes, seqs, ablations=False, **run)
        t_full = timed(evaluate_sequences, model, saes, seqs, ablations=True, **run)
        floor = t_clean + sum(t_spliced)
        floor_abl = floor + 3 * sum(t_spliced) + t_means
        print(f"clean forward + CE:            {t_clean:8.2f} s")
        for layer, t in zip(layers, t_spliced, strict=True):
            print(f"spliced after layer {layer:2d} + CE:   {t:8.2f} s")
        print(f"1 clean + {len(layers)} spliced:            {floor:8.2f} s")
        print(
            f"evaluate, no ablations:        {t_eval:8.2f} s   ratio {t_eval / floor:.2f} (goal <= 1.3)"
        )
        print(f"evaluate, with ablations:      {t_full:8.2f} s   ratio {t_full / floor:.2f}; "
              f"against its own floor (+3 ablated per site, mean pass {t_means:.2f} s): "
              f"{t_full / floor_abl:.2f}")  # fmt: skip
    if "sparse_probing" in evals:
        cfg = EvalConfig(probe_train=args.probe_train, probe_test=args.probe_test,
                         batch_size=args.batch_size * 4)  # fmt: skip
        tasks = build_tasks(cfg, tok)
        windows = [w for t in tasks for w in (t.train_ids, t.test_ids)]
        with torch.no_grad():
            t_windows = timed(lambda: [collect(model, w[i : i + cfg.batch_size].to(args.device), deepest)
                                       for w in windows for i in range(0, len(w), cfg.batch_size)])  # fmt: skip
            t_probe = timed(sparse_probing, model, tok, saes, tasks, cfg, progress=False)
        n_windows = sum(len(w) for w in windows)
        print(
            f"sparse probing, {len(tasks)} tasks:     {t_probe:8.2f} s   for {len(saes)} SAEs over "
            f"{n_windows:,} windows; forward floor {t_windows:.2f} s, ratio {t_probe / t_windows:.2f}"
        )
    if "absorption" in evals:
        cfg = EvalConfig(absorption_words=args.absorption_words, batch_size=32)
        prompts = spelling_prompts(tok, args.absorption_words)[0]
        pad, per = tok.pad_token_id or 0, prompts_per_batch(cfg)
        prompt_batches = [[t.to(args.device) for t in padded(prompts[i : i + per], pad)]
                          for i in range(0, len(prompts), per)]  # fmt: skip
        sparse_saes = [sparse(sae, model, prompt_batches[0][0][:64], skip) for sae in saes]
        with torch.no_grad():
            t_prompts = timed(lambda: [collect(model, ids, deepest, attention_mask=mask)
                                       for ids, mask in prompt_batches])  # fmt: skip
        t_absorb = timed(absorption, model, tok, sparse_saes, cfg, progress=False)
        print(
            f"absorption, {args.absorption_words:,} words: {t_absorb:8.2f} s   for {len(saes)} SAEs over "
            f"{len(prompts):,} prompts; forward floor {t_prompts:.2f} s, ratio {t_absorb / t_prompts:.2f}"
        )
    if "autointerp" in evals:
        sparse_saes = [sparse(sae, model, batches[0], skip) for sae in saes]  # L0 ~ 50
        with torch.no_grad():
            t_forward = timed(lambda: [collect(model, ids, deepest) for ids in batches])
        t_contexts = timed(collect_contexts, model, tok, sparse_saes, seqs, args.batch_size, False)
        print(f"autointerp contexts:           {t_contexts:8.2f} s   for {len(saes)} SAEs over "
              f"{len(seqs) * args.context_size:,} tokens; forward floor {t_forward:.2f} s, ratio "
              f"{t_contexts / t_forward:.2f}")  # fmt: skip


def sparse(sae: SAE, model: Any, ids: Tensor, skip: list[int], l0: int = 50) -> SAE:
    """`sae` with each latent's threshold at its (1 - l0 / width) quantile over these tokens' real
    positions (not BOS or padding), at least 0: L0 ~ l0, as a trained SAE's (absorption's cost grows
    with the latents that fire)."""
    key = (sae.cfg.layer, sae.cfg.site)
    with torch.no_grad():
        keep = ~torch.isin(ids, torch.tensor(skip, device=ids.device))  # (B, T)
        pre = sae.pre_acts(collect(model, ids, [key])[key][keep])  # (n, F)
        k = max(1, round(len(pre) * (1 - l0 / sae.cfg.d_sae)))
        sae.threshold.copy_(pre.kthvalue(k, dim=0).values.clamp_min(0))
    return sae


if __name__ == "__main__":
    main()
