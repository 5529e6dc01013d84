"""Interventions: rerun the model with chosen transcoder latents set to new values and see the next
token change. Each MLP a changed latent writes (its own; a CLT's, every later one too) writes what it
wrote plus `(new - a) * W_dec[latent]` at the chosen positions, `a` being the latent's activation in
this very forward (so a change upstream reaches it); everything downstream, attention and later
latents included, responds as the model does.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.circuits.replacement import Dictionary, prepare
from gemmascope.clt import CLT
from gemmascope.hooks import rewrite, run_until_head
from gemmascope.models import model_info
from gemmascope.sae import SAE

_SPEC = re.compile(r"(\d+):(\d+)(?:=(-?[\d.eE+-]+))?(?:@(\d+))?")


@dataclass(frozen=True)
class Change:
    """Set latent `latent` of layer `layer` to `value` at `position` (None: every position)."""

    layer: int
    latent: int
    value: float = 0.0
    position: int | None = None

    @classmethod
    def parse(cls, spec: str, *, ablate: bool) -> Change:
        """`LAYER:LATENT[@POS]` to ablate (value 0), `LAYER:LATENT=VALUE[@POS]` to steer."""
        m = _SPEC.fullmatch(spec.strip())
        if not m or (ablate and m[3] is not None) or (not ablate and m[3] is None):
            form = "LAYER:LATENT[@POSITION]" if ablate else "LAYER:LATENT=VALUE[@POSITION]"
            raise ValueError(
                f"{spec!r}: expected {form}, e.g. {'6:1234' if ablate else '6:1234=5'}"
            )
        return cls(int(m[1]), int(m[2]), 0.0 if ablate else float(m[3]),
                   None if m[4] is None else int(m[4]))  # fmt: skip


def intervene(
    model: nn.Module,
    ids: Tensor,
    transcoders: Sequence[SAE] | CLT,
    changes: Sequence[Change],
    *,
    top: int = 5,
) -> dict[str, Any]:
    """Next-token predictions at the last position of `ids [T]`, clean and with `changes` made.

    Returns `{"clean": [(token id, probability, logit)...], "changed": [...], "changes": [...]}`
    with the `top` likeliest tokens of each run, and `logit_shift` for each clean top token.
    """
    info = model_info(model)
    d = prepare(transcoders, info.n_layers)
    for c in changes:
        if not 0 <= c.layer < info.n_layers or not 0 <= c.latent < d.width:
            raise ValueError(
                f"{c}: no latent {c.latent} at layer {c.layer} (layers 0..{info.n_layers - 1}, "
                f"{d.width} latents each)"
            )
        if c.position is not None and not 0 <= c.position < len(ids):
            raise ValueError(
                f"{c}: position {c.position} is outside the prompt's {len(ids)} tokens"
            )
    clean = _logits(model, ids)
    coefficients: dict[Change, Tensor] = {}  # (T,) new - a, filled as the forward reaches each
    with contextlib.ExitStack() as stack, torch.no_grad():
        written = sorted({j for c in changes for j, _ in d.writes[c.layer]})
        for layer in written:
            stack.enter_context(_changed_mlp(model, layer, d, changes, coefficients))
        changed = _logits(model, ids)
    order = clean.topk(top).indices
    p0, p1 = clean.softmax(-1), changed.softmax(-1)
    return {
        "clean": [(int(i), float(p0[i]), float(clean[i])) for i in order],
        "changed": [(int(i), float(p1[i]), float(changed[i])) for i in changed.topk(top).indices],
        "logit_shift": {int(i): float(changed[i] - clean[i]) for i in order},
        "changes": [c.__dict__ for c in changes],
    }


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Logits `[V]` at the last position (soft-capped as the model does)."""
    with torch.no_grad():
        final = run_until_head(model, lambda: model(input_ids=ids[None], use_cache=False))
        logits = model.get_output_embeddings()(final[0, -1]).float()
        cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _changed_mlp(
    model: nn.Module, layer: int, d: Dictionary, changes: Sequence[Change],
    coefficients: dict[Change, Tensor],
) -> contextlib.AbstractContextManager[None]:  # fmt: skip
    """While active, MLP `layer` adds what the changes of its own and earlier layers write there."""

    def write(x_in: Tensor, value: Tensor) -> Tensor:
        mine = [c for c in changes if c.layer == layer]
        if mine:
            a = d.encoders[layer].encode(x_in[0].float())  # (T, F) the latents in this forward
            for c in mine:
                at = slice(None) if c.position is None else slice(c.position, c.position + 1)
                coefficient = torch.zeros(a.shape[0])
                coefficient[at] = c.value - a[at, c.latent]
                coefficients[c] = coefficient
        delta = torch.zeros_like(value[0], dtype=torch.float32)  # (T, d)
        for c, coefficient in coefficients.items():
            w = dict(d.writes[c.layer]).get(layer)
            if w is not None:
                delta += coefficient[:, None] * w[c.latent].float()
        return value.float() + delta[None]

    return rewrite(model, layer, "mlp_out", write, source="mlp_in")
