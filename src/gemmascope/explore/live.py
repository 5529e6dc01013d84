"""The models and SAEs behind prompt search, co-firing, neighbours and steering: loaded on first use.

Each index's meta names its model and SAE (`gemmascope index` stores local paths absolute), so the
explorer needs no other argument; nothing a request sends is ever used as a path. A lock serialises
all use of the models, because steering splices a hook into one that no other request may see.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from gemmascope.corpus import special_ids
from gemmascope.corpus.tokens import display_texts
from gemmascope.explore.catalog import Entry
from gemmascope.hooks import collect, splice
from gemmascope.sae import SAE

MAX_TOKENS = 256
"""Longest text (in tokens, BOS included) that prompt search and steering prompts accept."""


class InputError(ValueError):
    """A request the model cannot serve as sent (too many tokens, unknown latent); the API answers 422."""


class Unavailable(RuntimeError):
    """An index's model or SAE could not be loaded (moved, deleted, unreadable); the API answers 503."""


class Live:
    """Models, tokenizers and SAEs of a catalog's indexes, each loaded the first time it is needed.

    Args:
        device: where to load them.
        model, tokenizer: an already loaded model (tests), used for every index.
    """

    def __init__(self, device: str = "cpu", *, model: Any = None, tokenizer: Any = None) -> None:
        self.device = device
        self._given = (model, tokenizer) if model is not None else None
        self._models: dict[str, tuple[Any, Any]] = {}
        self._saes: dict[str, SAE] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ loading (lock held)
    def _model(self, entry: Entry) -> tuple[Any, Any]:
        if self._given is not None:
            return self._given
        name = str(entry.meta["model"])
        if name not in self._models:
            from gemmascope.models import load_model

            try:
                self._models[name] = load_model(name, device=self.device)
            except (OSError, RuntimeError, ValueError, ImportError) as err:
                raise Unavailable(
                    f"the model {name!r} of this index could not be loaded: {err}"
                ) from err
        return self._models[name]

    def _sae(self, entry: Entry) -> SAE:
        if entry.key not in self._saes:
            from gemmascope import io
            from gemmascope.explore.index import layer_of

            meta = entry.meta
            try:
                loaded = io.load(meta["sae_source"], meta.get("sae_id"), device=self.device)
            except (OSError, RuntimeError, ValueError, ImportError) as err:
                raise Unavailable(f"the SAE {meta['sae_source']!r} of this index could not be "
                                  f"loaded: {err}") from err  # fmt: skip
            self._saes[entry.key] = layer_of(
                loaded, meta.get("clt_layer"), meta["sae_source"]
            ).eval()
        return self._saes[entry.key]

    def units(self, entry: Entry) -> torch.Tensor:
        """Unit-length decoder rows `[d_sae, d_in]` of an SAE, for cosine neighbours."""
        with self._lock:
            w = self._sae(entry).W_dec.detach().float().cpu()  # (m, d_in)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

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

    # ------------------------------------------------------------ what fires
    def fires(self, text: str, entries: list[Entry], *, top: int = 5,
              features: int = 30) -> dict[str, Any]:  # fmt: skip
        """Which latents of each SAE fire on each token of `text`, from one forward of its model.

        Returns:
            `tokens`: per token its id, display text and whether it is special (never counted);
            `saes`: per entry its `key`, per token its `top` latents with positive activation
            (`latents`), and up to `features` latents by their maximum over the text (`features`,
            each with its activation on every token).
        """
        if len({e.meta["model"] for e in entries}) > 1:
            raise InputError("these SAEs read different models; search one model's SAEs at a time")
        with self._lock:
            model, tokenizer = self._model(entries[0])
            ids = self._encode_text(tokenizer, model, text)
            device = next(model.parameters()).device
            saes = [self._sae(e) for e in entries]
            with torch.no_grad():
                acts = collect(model, ids[None].to(device), [(e.layer, e.site) for e in entries])
                zs = [
                    sae.encode(acts[e.layer, e.site][0].to(sae.device)).float().cpu()
                    for e, sae in zip(entries, saes, strict=True)
                ]  # fmt: skip (T, m) each
        special = torch.isin(ids, torch.tensor(special_ids(tokenizer), dtype=torch.long))
        texts = display_texts(tokenizer, ids.tolist())
        tokens = [{"id": i, "text": t, "special": bool(s)}
                  for i, t, s in zip(ids.tolist(), texts, special.tolist(), strict=True)]  # fmt: skip
        return {"tokens": tokens, "saes": [_fired(e.key, z, special, top, features)
                                           for e, z in zip(entries, zs, strict=True)]}  # fmt: skip

    def on_windows(self, entry: Entry, windows: list[list[int]]) -> list[torch.Tensor]:
        """The SAE's latents `[len(window), d_sae]` on each token window, run after a BOS when it
        does not start with one (a window cut from the middle of a text lacks the start the model
        expects)."""
        with self._lock:
            model, tokenizer = self._model(entry)
            sae = self._sae(entry)
            device = next(model.parameters()).device
            bos = tokenizer.bos_token_id
            out = []
            with torch.no_grad():
                for window in windows:
                    lead = [bos] if bos is not None and window[:1] != [bos] else []
                    ids = torch.tensor([lead + window], dtype=torch.long, device=device)
                    x = collect(model, ids, [(entry.layer, entry.site)])[entry.layer, entry.site]
                    out.append(sae.encode(x[0].to(sae.device)).float().cpu()[len(lead) :])
            return out

    # ------------------------------------------------------------ steering
    def steer(self, entry: Entry, prompt: str, feature: int, strength: float,
              max_new_tokens: int) -> dict[str, Any]:  # fmt: skip
        """Greedy continuations of `prompt` without and with `strength * W_dec[feature]` added at the site.

        The direction is added at every position (the prompt's and the generated ones), in the scale
        of the raw activations, i.e. as if the latent's activation were raised by `strength`.
        """
        if entry.meta.get("clt_layer") is not None:
            raise InputError(
                "this index holds one layer of a cross-layer transcoder, whose latents write every "
                "later layer too; steer them with `gemmascope graph --steer LAYER:LATENT=VALUE`"
            )
        with self._lock:
            model, tokenizer = self._model(entry)
            sae = self._sae(entry)
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

            with splice(model, entry.layer, entry.site, add):
                steered = _greedy(model, tokenizer, ids, max_new_tokens)
        return {"prompt": prompt, "feature": feature, "strength": strength,
                "max_new_tokens": max_new_tokens, "unsteered": plain, "steered": steered}  # fmt: skip


def _fired(key: str, z: torch.Tensor, special: torch.Tensor, top: int,
           features: int) -> dict[str, Any]:  # fmt: skip
    """One SAE's part of `Live.fires`: `z` is `[T, d_sae]`."""
    z = z.clone()
    z[special] = 0
    vals, idx = z.topk(min(top, z.shape[1]), dim=1)  # (T, top)
    latents = [[{"id": int(i), "act": float(v)} for v, i in zip(vs, js, strict=True) if v > 0]
               for vs, js in zip(vals.tolist(), idx.tolist(), strict=True)]  # fmt: skip
    peak = z.max(dim=0).values  # (m,)
    best = peak.topk(min(features, len(peak)))
    chosen = [int(i) for v, i in zip(best.values, best.indices, strict=True) if v > 0]
    return {"key": key, "latents": latents,
            "features": [{"id": i, "max_act": float(peak[i]), "acts": z[:, i].tolist()}
                         for i in chosen]}  # fmt: skip


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
