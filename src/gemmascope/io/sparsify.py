"""EleutherAI sparsify folders: one per hookpoint, `cfg.json` + `sae.safetensors`, as
`SparseCoder.save_to_disk` writes them.

Mapping (sparsify -> ours), exact in encodings:
- `encoder` is an `nn.Linear`: `W_enc = encoder.weight.T`, `b_enc = encoder.bias`; `W_dec`, `b_dec` as is.
- `activation: topk` -> topk with the config's `k`: the `k` largest of `relu(pre)`, which equals our
  `relu` of the `k` largest `pre`. `groupmax` has no counterpart here and is refused.
- An SAE subtracts `b_dec` from its input (`apply_b_dec_to_input`); a transcoder (`transcode`) does not.
  A skip transcoder adds `x @ W_skip.T` to its output: our `W_skip` is its transpose.
- The folder name is the hookpoint. An SAE reads the module's output: `layers.6` (or `h.6`) is a
  block's, our `resid_post`; `layers.6.mlp` the MLP's, our `mlp_out`. A transcoder reads the
  module's input and predicts its output: `layers.6` maps `resid_pre -> resid_post`, `layers.6.mlp`
  `mlp_in -> mlp_out`. (For Gemma, sparsify's MLP output is before the post-feedforward norm, where
  our `mlp_out` is after it: its Gemma MLP transcoders predict another quantity than ours.)
sparsify has only TopK, so other architectures are refused on save rather than changed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from gemmascope.common.files import atomic_dir, read_json, write_json
from gemmascope.io._common import (
    check_names,
    our_fields,
    read_our_fields,
    read_safetensors,
    site_to_hook,
)
from gemmascope.sae import SAE, SAEConfig

_WEIGHTS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip")
_MAPPED = {"d_in", "k", "num_latents", "activation", "transcode", "skip_connection", "gemmascope"}
_BLOCK_RE = re.compile(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(\.mlp)?")
"""A hookpoint naming a whole decoder block or its MLP."""


def _where(hookpoint: str, transcode: bool) -> dict[str, Any]:
    m = _BLOCK_RE.fullmatch(hookpoint)
    if not m:
        return {"hook_name": hookpoint}
    if transcode:  # the module's input -> its output
        site, target = ("mlp_in", "mlp_out") if m[2] else ("resid_pre", "resid_post")
    else:
        site, target = ("mlp_out" if m[2] else "resid_post"), None
    return {"layer": int(m[1]), "site": site, "target_site": target, "hook_name": hookpoint}


def read_sparsify(
    folder: Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE:
    """Load a sparsify `SparseCoder` folder into our SAE, with encodings equal to sparsify's."""
    cfg_file, weights = folder / "cfg.json", folder / "sae.safetensors"
    raw = read_json(cfg_file)
    if raw.get("activation", "topk") != "topk":
        raise ValueError(
            f"{cfg_file}: activation {raw['activation']!r} is not supported; gemmascope reads "
            "sparsify's `topk` coders only (groupmax keeps the largest latent of each of k groups)"
        )
    state = read_safetensors(weights)
    check_names(state, _WEIGHTS, weights)
    transcode, skip = bool(raw.get("transcode")), bool(raw.get("skip_connection"))
    if skip != ("W_skip" in state):
        raise ValueError(
            f"{folder}: cfg.json says skip_connection={skip} but sae.safetensors "
            f"{'lacks' if skip else 'holds'} 'W_skip'; the folder is inconsistent"
        )
    d_in, k = raw.get("d_in"), raw.get("k")
    if not isinstance(d_in, int) or not isinstance(k, int):
        raise ValueError(f"{cfg_file}: expected integer fields `d_in` and `k`, got {d_in!r}, {k!r}")
    enc = state.get("encoder.weight")
    if enc is None or enc.ndim != 2 or enc.shape[1] != d_in:
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        raise ValueError(
            f"{weights}: expected 'encoder.weight' of shape (num_latents, {d_in}); found {shapes}"
        )
    d_sae = enc.shape[0]
    expected = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    if expected != d_sae:
        raise ValueError(f"{cfg_file}: says {expected} latents but encoder.weight has {d_sae}")
    arrays = {
        "W_enc": enc.T,
        "b_enc": state.get("encoder.bias"),
        "W_dec": state.get("W_dec"),
        "b_dec": state.get("b_dec"),
    }
    if skip:
        arrays["W_skip"] = state["W_skip"].T
    arrays = {n: t for n, t in arrays.items() if t is not None}  # from_arrays names what is missing
    fields = {**_where(folder.name, transcode), **read_our_fields(raw, cfg_file)}
    if skip and not fields.get("target_site"):
        raise ValueError(
            f"{folder}: a skip transcoder at hookpoint {folder.name!r}, which names no module we "
            "know the output of; name the folder after its hookpoint (e.g. `layers.6.mlp`)"
        )
    extra = dict(fields.pop("extra", {}))
    carried = {key: v for key, v in raw.items() if key not in _MAPPED}
    extra["sparsify"] = {**carried, "transcode": transcode}
    try:
        cfg = SAEConfig(
            architecture="topk",
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            dtype=dtype or str(enc.dtype).removeprefix("torch."),
            apply_b_dec_to_input=not transcode,
            skip_connection=skip,
            extra=extra,
            **fields,
        )
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return SAE.from_arrays(cfg, arrays, source=str(weights), allow_nonfinite=allow_nonfinite)


def _is_transcoder(cfg: SAEConfig) -> bool:
    return bool(cfg.target_site or cfg.extra.get("sparsify", {}).get("transcode"))


def write_sparsify(sae: SAE, folder: Path) -> Path:
    """Write a topk `sae` as a folder that sparsify's `SparseCoder.load_from_disk` loads with the
    same encodings. Name the folder after the hookpoint (`layers.6`, `layers.6.mlp` for an MLP
    transcoder), as sparsify does."""
    c = sae.cfg
    if c.architecture != "topk":
        why = (
            "its inference rule is a per-latent threshold, not k per token"
            if c.architecture == "batchtopk"
            else "it has no k"
        )
        raise ValueError(
            f"{folder}: a {c.architecture} SAE cannot be saved for sparsify, whose coders are TopK "
            f"only ({why}), so its encodings would change. Save it as 'saelens', 'gemmascope' or "
            "'dictionary_learning'"
        )
    transcode = _is_transcoder(c)
    s = copy.deepcopy(sae).fold_input_scale()
    if transcode:
        s.fold_b_dec_into_b_enc()  # transcoders encode x as it is
    b_enc = s.b_enc.detach()
    if not transcode and not s.cfg.apply_b_dec_to_input:
        b_enc = b_enc + s.b_dec.detach() @ s.W_enc.detach()  # sparsify subtracts b_dec first
    tensors = {
        "encoder.weight": s.W_enc.detach().T,
        "encoder.bias": b_enc,
        "W_dec": s.W_dec.detach(),
        "b_dec": s.b_dec.detach(),
    }
    if s.W_skip is not None:
        tensors["W_skip"] = s.W_skip.detach().T
    tensors = {n: t.cpu().contiguous() for n, t in tensors.items()}
    carried = {key: v for key, v in c.extra.get("sparsify", {}).items() if key not in _MAPPED}
    fields = our_fields(s.cfg)
    fields["hook_name"] = fields["hook_name"] or site_to_hook(c.layer, c.site)
    fields["extra"] = {key: v for key, v in c.extra.items() if key != "sparsify"}
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": True,
        "multi_topk": False,
        **carried,
        "num_latents": c.d_sae,  # wins over expansion_factor
        "k": c.k,
        "skip_connection": c.skip_connection,
        "transcode": transcode,
        "d_in": c.d_in,
        "gemmascope": fields,  # sparsify drops fields it does not know
    }
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / "sae.safetensors", metadata={"format": "pt"})
        write_json(tmp / "cfg.json", cfg)
    return folder
