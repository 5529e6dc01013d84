"""Is an SAE's ΔLM loss its own fault, or the site's sensitivity? The SAE against noise of equal FVU.

On the same held-out sequences, in this process, the value at the SAE's (layer, site) is replaced by:

- the SAE's reconstruction (what `evaluate` scores);
- the activations plus isotropic Gaussian noise with the SAE's FVU (the same squared error, spread
  evenly over the dimensions);
- the activations plus noise shaped like the activations' own variance (the error an SAE makes if it
  is equally good, relatively, on every dimension), again with the SAE's FVU;
- the activations plus the SAE's own errors shuffled across tokens (its error covariance, not
  tied to the token).

It prints each ΔLM loss and its ratio to the SAE's, and how the activations' variance and the SAE's
error split between the top dimension and the rest. Where the SAE's ΔLM is close to isotropic noise's,
its error is spread evenly while the site's variance is not: FVU flatters it.

    python bench/sensitivity.py suite/publish/resid_post --sae-id layer_6/width_4k/average_l0_50
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import gemmascope
from gemmascope.corpus import iter_documents, pack_sequences, special_ids
from gemmascope.hooks import collect, splice
from gemmascope.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sae", help="an SAE: a folder, npz file or published suite site folder")
    ap.add_argument("--sae-id", default=None)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    sae = gemmascope.load(args.sae, args.sae_id)
    layer, site = sae.cfg.layer, sae.cfg.site
    model, tok = load_model(args.model)
    docs = iter_documents("default", "eval")
    n_seqs = max(1, args.tokens // args.context_size)
    packed = pack_sequences(docs, tok, args.context_size)
    seqs = [np.asarray(next(packed)) for _ in range(n_seqs)]
    ids = torch.as_tensor(np.stack(seqs), dtype=torch.long)  # (B, T)
    mask = ~torch.isin(ids, torch.tensor(special_ids(tok)))  # positions the SAE replaces

    def loss() -> float:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        scored = mask[:, 1:]
        return float(F.cross_entropy(logits[scored], ids[:, 1:][scored]))

    def delta(new: Tensor) -> float:
        """ΔLM loss with `new` (`[n, d]`, float64) at the masked positions of the site."""

        def put(value: Tensor) -> Tensor:
            out = value.clone()
            out[mask] = new.to(value.dtype)
            return out

        with splice(model, layer, site, put):
            return loss() - clean

    with torch.no_grad():
        clean = loss()
        x = collect(model, ids, [(layer, site)])[layer, site][mask].double()  # (n, d)
        var = x.var(0, correction=0)  # (d,)
        tss = float(var.sum()) * len(x)
        err = sae.decode(sae.encode(x.float())).double() - x
        fvu = float(err.pow(2).sum()) / tss

        def noise(shape: Tensor) -> Tensor:
            n = torch.randn_like(x) * shape
            return x + n * (fvu * tss / float(n.pow(2).sum())) ** 0.5

        rows = {
            "SAE reconstruction": delta(x + err),
            "isotropic noise, same FVU": delta(noise(torch.ones_like(var))),
            "variance-shaped noise, same FVU": delta(noise(var.sqrt())),
            "SAE errors shuffled across tokens": delta(x + err[torch.randperm(len(err))]),
        }
    top = int(var.argmax())
    err_var = err.pow(2).mean(0)
    print(f"{args.sae} {args.sae_id or ''}: layer {layer} {site}, {len(x):,} tokens, clean CE "
          f"{clean:.3f} nats, SAE FVU {fvu:.4f}")  # fmt: skip
    print(f"top dimension ({top}): {float(var[top] / var.sum()):.1%} of the variance, "
          f"{float(err_var[top] / err_var.sum()):.1%} of the SAE's squared error; FVU on the other "
          f"dimensions {float((err_var.sum() - err_var[top]) / (var.sum() - var[top])):.4f}")  # fmt: skip
    sae_delta = rows["SAE reconstruction"]
    for name, value in rows.items():
        print(f"  {name:36s} ΔLM {value:7.3f} nats   ratio to the SAE {value / sae_delta:6.2f}")


if __name__ == "__main__":
    main()
