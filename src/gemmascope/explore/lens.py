"""Logit lens of SAE latents: which output tokens a latent's decoder direction promotes and suppresses.

The direction is `W_dec[l]` in the scale of the raw activations. A direction read at `attn_z` is first
carried into the residual stream through the attention output projection (and, for Gemma, the scale
of the post-attention norm). It then goes through the final norm and the unembedding `W_U`.

The final norm is applied as its elementwise scale only: Gemma's RMSNorm multiplies by `(1 + w)`,
Llama's by `w`, GPT-2's LayerNorm by its weight. The division by the RMS (or the centring and bias of
LayerNorm) depends on the whole residual stream of a context, not on the direction; the RMS is one
positive number per context, so leaving it out changes the scale of the logits but not which tokens
rank highest. A direction has no context, so it is the only choice that does not invent one. Gemma 2's
final logit soft-cap is monotonic and is left out for the same reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gemmascope.models import model_info
from gemmascope.sae import SAE


class LogitLens(NamedTuple):
    """Top and bottom output tokens of every latent (`[d_sae, k]` each, values descending/ascending)."""

    top_values: Tensor
    top_ids: Tensor
    bottom_values: Tensor
    bottom_ids: Tensor


def residual_directions(model: Any, sae: SAE, layer: int, site: str) -> Tensor:
    """Decoder directions `[d_sae, d_model]` as they enter the residual stream, in raw activation scale."""
    info = model_info(model)
    with torch.no_grad():
        dirs = sae.W_dec.float() * sae.cfg.input_scale  # (m, width)
        if site != "attn_z":
            return dirs
        from gemmascope.hooks import decoder_layers

        block: Any = decoder_layers(model)[layer]
        if info.layout == "gpt2":  # Conv1D stores its weight as (in, out)
            return dirs @ block.attn.c_proj.weight.float()
        dirs = dirs @ block.self_attn.o_proj.weight.float().T  # (m, d_model)
        if info.layout == "gemma":
            dirs = dirs * _norm_scale(block.post_attention_layernorm, info.layout)
        return dirs


def final_norm_scale(model: Any) -> Tensor:
    """The elementwise scale `[d_model]` of the model's final norm (see the module docstring)."""
    info = model_info(model)
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    if norm is None:
        lm = getattr(base, "language_model", None)
        norm = getattr(lm, "norm", None)
    if norm is None:
        raise RuntimeError(f"found no final norm in {type(model).__name__} (looked for norm, ln_f)")
    return _norm_scale(norm, info.layout)


def _norm_scale(norm: Any, layout: str) -> Tensor:
    weight = norm.weight.detach().float()
    return 1.0 + weight if layout == "gemma" else weight


def logit_lens(
    model: Any, sae: SAE, layer: int, site: str, *, k: int = 10, block: int = 256
) -> LogitLens:
    """The `k` most promoted and most suppressed output tokens of every latent.

    Args:
        model: the Hugging Face causal LM the SAE reads.
        sae: the SAE.
        layer, site: where the SAE reads (`attn_z` directions are projected into the residual stream).
        k: tokens per end.
        block: latents per matrix product (memory: `block * vocab * 4` bytes).
    Returns:
        A `LogitLens` on the CPU.
    """
    dirs = residual_directions(model, sae, layer, site) * final_norm_scale(model).to(sae.device)
    w_u = model.get_output_embeddings().weight.detach()  # (V, d_model)
    k = min(k, w_u.shape[0])
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        for start in range(0, dirs.shape[0], block):
            d = dirs[start : start + block].to(w_u.device, w_u.dtype)
            logits = torch.nn.functional.linear(d, w_u).float()  # (block, V)
            top = logits.topk(k, dim=1)
            bottom = logits.topk(k, dim=1, largest=False)
            parts.append((top.values, top.indices, bottom.values, bottom.indices))
    return LogitLens(*(torch.cat([p[i] for p in parts]).cpu() for i in range(4)))
