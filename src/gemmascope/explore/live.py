"""The model and SAE behind "what fires here" and steering: loaded on first use, used one request at a time.

The index's meta names the model and the SAE (`gemmascope index` stores local paths absolute), so the
explorer needs no other argument; nothing a request sends is ever used as a path. A lock serialises
all use of the model, because steering splices a hook into it that no other request may see.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from gemmascope.corpus import special_ids
from gemmascope.hooks import collect, splice
from gemmascope.sae import SAE

MAX_TOKENS = 256
"""Longest text (in tokens, BOS included) that "what fires here" and steering prompts accept."""


class InputError(ValueError):
    """A request the model cannot serve as sent (too many tokens, unknown latent); the API answers 422."""


class Live:
    """Model, tokenizer and SAE of an index, loaded lazily.

    Args:
        meta: the index's meta (`model`, `sae_source`, `sae_id`, `layer`, `site`).
        model, tokenizer, sae: already loaded objects (tests); default: loaded from `meta` on first use.
        device: where to load them.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        *,
        model: Any = None,
        tokenizer: Any = None,
        sae: SAE | None = None,
        device: str = "cpu",
    ) -> None:
        self.meta, self.device = meta, device
        self.layer, self.site = int(meta["layer"]), str(meta["site"])
        self._model, self._tokenizer, self._sae = model, tokenizer, sae
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None and self._sae is not None

    def _ensure(self) -> tuple[Any, Any, SAE]:
        """Load what is missing; call with the lock held."""
        if self._model is None or self._tokenizer is None:
            from gemmascope.models import load_model

            self._model, self._tokenizer = load_model(self.meta["model"], device=self.device)
        if self._sae is None:
            from gemmascope import io
            from gemmascope.explore.index import layer_of

            loaded = io.load(self.meta["sae_source"], self.meta.get("sae_id"), device=self.device)
            self._sae = layer_of(loaded, self.meta.get("clt_layer"), self.meta["sae_source"])
        return self._model, self._tokenizer, self._sae.eval()

    def _encode_text(self, tokenizer: Any, model: Any, text: str) -> torch.Tensor:
        """Token ids `[T]` of `text`, BOS first as in the index; InputError when too long."""
        ids = tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        limit = min(MAX_TOKENS, int(getattr(model.config, "max_position_embeddings", MAX_TOKENS)))
        if len(ids) > limit:
            raise InputError(f"the text is {len(ids)} tokens long; at most {limit} are accepted")
        return torch.tensor(ids, dtype=torch.long)

    def fires(self, text: str, *, top: int = 5, features: int = 30) -> dict[str, Any]:
        """Which latents fire on each token of `text`, and the strongest latents over the text.

        Returns:
            `tokens`: per token its id, string, whether it is special (never counted) and its `top`
            latents with positive activation; `features`: up to `features` latents by their maximum
            over the text, each with its activation on every token.
        """
        with self._lock:
            model, tokenizer, sae = self._ensure()
            ids = self._encode_text(tokenizer, model, text)
            device = next(model.parameters()).device
            with torch.no_grad():
                x = collect(model, ids[None].to(device), [(self.layer, self.site)])
                z = sae.encode(x[self.layer, self.site][0].to(sae.device)).float().cpu()  # (T, m)
        special = torch.isin(ids, torch.tensor(special_ids(tokenizer), dtype=torch.long))
        z[special] = 0
        vals, idx = z.topk(min(top, z.shape[1]), dim=1)  # (T, top)
        tokens = []
        for t, token in enumerate(ids.tolist()):
            latents = [{"id": int(i), "act": float(v)}
                       for v, i in zip(vals[t], idx[t], strict=True) if v > 0]  # fmt: skip
            tokens.append({"id": token, "text": tokenizer.decode([token]),
                           "special": bool(special[t]), "latents": latents})  # fmt: skip
        peak = z.max(dim=0).values  # (m,)
        best = peak.topk(min(features, len(peak)))
        chosen = [int(i) for v, i in zip(best.values, best.indices, strict=True) if v > 0]
        return {
            "tokens": tokens,
            "features": [
                {"id": i, "max_act": float(peak[i]), "acts": z[:, i].tolist()} for i in chosen
            ],  # fmt: skip
        }

    def steer(
        self, prompt: str, feature: int, strength: float, max_new_tokens: int
    ) -> dict[str, Any]:
        """Greedy continuations of `prompt` without and with `strength * W_dec[feature]` added at the site.

        The direction is added at every position (the prompt's and the generated ones), in the scale
        of the raw activations, i.e. as if the latent's activation were raised by `strength`.
        """
        if self.meta.get("clt_layer") is not None:
            raise InputError(
                "this index holds one layer of a cross-layer transcoder, whose latents write every "
                "later layer too; steer them with `gemmascope graph --steer LAYER:LATENT=VALUE`"
            )
        with self._lock:
            model, tokenizer, sae = self._ensure()
            if not 0 <= feature < sae.cfg.d_sae:
                raise InputError(
                    f"feature {feature} does not exist; the SAE has 0..{sae.cfg.d_sae - 1}"
                )
            ids = self._encode_text(tokenizer, model, prompt)
            direction = (
                sae.W_dec[feature].detach().float() * sae.cfg.input_scale
            ).cpu()  # (width,)
            plain = _greedy(model, tokenizer, ids, max_new_tokens)

            def add(value: torch.Tensor) -> torch.Tensor:
                return value + strength * direction.to(value.device, value.dtype)

            with splice(model, self.layer, self.site, add):
                steered = _greedy(model, tokenizer, ids, max_new_tokens)
        return {"prompt": prompt, "feature": feature, "strength": strength,
                "max_new_tokens": max_new_tokens, "unsteered": plain, "steered": steered}  # fmt: skip


def _greedy(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy decoding with the KV cache; stops at EOS. Returns the new text only."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    # A fresh config: the model's own may ask for sampling (top_k, top_p), which greedy ignores.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    with torch.no_grad():
        out = model.generate(input_ids=ids[None].to(device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             generation_config=config)  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
