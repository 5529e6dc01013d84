"""Gemma Scope 2 folders: `params.safetensors` + `config.json`, laid out in repos such as
`google/gemma-scope-2-1b-pt` as `{site}[_all]/layer_{L}_width_{W}_l0_{size}/`.

The arrays are Gemma Scope's, named in lower case: `w_enc [d_in, d_sae]`, `w_dec [d_sae, d_out]`,
`b_enc`, `b_dec`, `threshold`; JumpReLU `pre * (pre > threshold)` with no `b_dec` subtraction.
`config.json` holds `architecture: "jump_relu"`, `model_name` and the Hugging Face module paths read
(`hf_hook_point_in`) and, for transcoders, written (`hf_hook_point_out`); SAELens' Gemma 3 loader reads
the same fields. Transcoders read `pre_feedforward_layernorm.output` (our `mlp_in`) and write
`post_feedforward_layernorm.output` (our `mlp_out`); affine skip transcoders (`affine_connection`)
add `affine_skip_connection [d_in, d_out]`, applied as `x @ affine_skip_connection`: our `W_skip`.
Cross-layer transcoders (`clt/`) hold one `layer_{i}.safetensors` per layer whose `w_dec` is
`[d_sae, n_layers, d_out]`, zero into the layers before `i` (as circuit-tracer's and SAELens' loaders
read them).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from gemmascope.clt import CLT
from gemmascope.common.files import atomic_dir, read_json, write_json
from gemmascope.io._common import (
    check_names,
    our_fields,
    read_our_fields,
    read_safetensors,
    sae_dims,
    site_to_hook,
)
from gemmascope.io.gemmascope_npz import WIDTHS
from gemmascope.sae import SAE, SAEConfig

ARRAYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection")
_HF_POINTS = {
    "resid_post": "model.layers.{L}.output",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}
"""Our site -> the module path Gemma Scope 2 names in `hf_hook_point_in` (and `_out`)."""
_HF_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_DIR_RE = re.compile(r"layer_(\d+)_width_(\w+?)_l0_(\w+?)(_affine)?$")


def _point(path: object) -> tuple[int, str] | None:
    """(layer, site) of a Hugging Face module path Gemma Scope 2 names, or None."""
    m = _HF_RE.fullmatch(str(path or ""))
    site = next((s for s, p in _HF_POINTS.items() if m and p.endswith("." + m[2])), None)
    return (int(m[1]), site) if m and site else None


def _where(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Layer, site and target site from `hf_hook_point_in`/`_out`, else from the folder names."""
    info: dict[str, Any] = {"extra": {}}
    m = _DIR_RE.fullmatch(folder.name)
    if m:
        info["layer"] = int(m[1])
        info["extra"].update(width=m[2], l0=m[3])
    read, written = _point(raw.get("hf_hook_point_in")), _point(raw.get("hf_hook_point_out"))
    if read:
        info["layer"], site = read
    else:  # no config.json: the folder kind says what it reads
        kind = folder.parent.name.removesuffix("_all")
        site = {"resid_post": "resid_post", "mlp_out": "mlp_out", "attn_out": "attn_z"}.get(kind)
        if kind.startswith("transcoder") or raw.get("affine_connection") is not None:
            site, written = "mlp_in", (info.get("layer"), "mlp_out")
    if written:
        info["target_site"] = written[1]
    if site and "layer" in info:
        info.update(site=site, hook_name=site_to_hook(info["layer"], site))
    return info


def read_gemmascope2(
    folder: Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE:
    """Load a Gemma Scope 2 `params.safetensors` folder (config.json optional, as on the hub)."""
    weights, cfg_file = folder / "params.safetensors", folder / "config.json"
    raw = read_json(cfg_file) if cfg_file.is_file() else {}
    arch = raw.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise ValueError(
            f"{cfg_file}: architecture {arch!r} is not supported; expected 'jump_relu'"
        )
    state = read_safetensors(weights)
    check_names(state, ARRAYS, weights)
    skip = "affine_skip_connection" in state
    if raw.get("affine_connection") and not skip:
        raise ValueError(
            f"{folder}: config.json says affine_connection but params.safetensors has no "
            "'affine_skip_connection'; the folder is incomplete"
        )
    w_enc = state.get("w_enc")
    if w_enc is None or w_enc.ndim != 2:
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        raise ValueError(
            f"{weights}: expected array 'w_enc' of shape (d_in, d_sae); found {shapes}"
        )
    names = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec",
             "threshold": "threshold"}  # fmt: skip
    d_in, d_sae = sae_dims({n: tuple(t.shape) for n, t in state.items()}, names)
    info = {**_where(raw, folder), **read_our_fields(raw, cfg_file)}
    width = info["extra"].get("width")
    if width in WIDTHS and WIDTHS[width] != d_sae:
        raise ValueError(
            f"{folder}: the folder says width_{width} ({WIDTHS[width]} latents) but w_enc has {d_sae}"
        )
    extra = dict(info.pop("extra"))
    carried = {
        key: v
        for key, v in raw.items()
        if key not in ("architecture", "model_name", "gemmascope", "affine_connection")
    }
    if carried:
        extra["gemmascope2"] = carried
    info.setdefault("model", raw.get("model_name"))
    try:
        cfg = SAEConfig(
            architecture="jumprelu",
            d_in=d_in,
            d_sae=d_sae,
            dtype=dtype or str(w_enc.dtype).removeprefix("torch."),
            skip_connection=skip,
            extra=extra,
            **info,
        )
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    arrays = {"W_" + n[2:] if n.startswith("w_") else n: t for n, t in state.items()}
    if skip:
        arrays["W_skip"] = arrays.pop("affine_skip_connection")
    return SAE.from_arrays(cfg, arrays, source=str(weights), allow_nonfinite=allow_nonfinite)


def write_gemmascope2(sae: SAE, folder: Path) -> Path:
    """Write `sae` as Gemma Scope 2's `params.safetensors` + `config.json`.

    As for Gemma Scope's npz, input scale and `b_dec` subtraction are folded into a copy; relu is
    JumpReLU with threshold 0 and batchtopk its inference JumpReLU (so `k` is dropped); topk refused.
    """
    if sae.cfg.architecture == "topk":
        raise ValueError(
            f"{folder}: a topk SAE cannot be saved as Gemma Scope 2, which has no `k` and only "
            "JumpReLU; save it with format='gemmascope', 'saelens' or 'sparsify'"
        )
    s = copy.deepcopy(sae).fold_input_scale().fold_b_dec_into_b_enc()
    names = {"W_skip": "affine_skip_connection"}
    tensors = {
        names.get(n, n.lower()): t.detach().cpu().contiguous() for n, t in s.state_arrays().items()
    }
    if s.cfg.architecture == "relu":
        tensors["threshold"] = torch.zeros_like(tensors["threshold"])
    c = s.cfg
    carried = dict(c.extra.get("gemmascope2") or {})
    for key, site in (("hf_hook_point_in", c.site), ("hf_hook_point_out", c.target_site)):
        point = _HF_POINTS.get(site or "")
        if point and c.layer is not None:
            carried[key] = point.format(L=c.layer)
    if c.target_site:
        carried["affine_connection"] = c.skip_connection
    fields = our_fields(c)
    fields["extra"] = {key: v for key, v in c.extra.items() if key != "gemmascope2"}
    config = {"architecture": "jump_relu", "model_name": c.model, **carried, "gemmascope": fields}
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / "params.safetensors")
        write_json(tmp / "config.json", config)
    return folder


def is_clt_folder(folder: Path) -> bool:
    """Whether `folder` holds a Gemma Scope 2 CLT: `layer_{i}.safetensors` files with lower-case
    names (a circuit-tracer transcoder set has the same file names beside a `config.yaml`)."""
    return (folder / "layer_0.safetensors").is_file() and not (folder / "config.yaml").exists()


def write_gemmascope2_clt(clt: CLT, folder: Path) -> Path:
    """Write a CLT as Gemma Scope 2 does (`clt/width_{W}_l0_{size}/`): per layer `layer_{i}.safetensors`
    with `w_enc [d, F]`, `w_dec [F, n_layers, d]` (zero into earlier layers), `b_enc`, `b_dec`,
    `threshold` and, for an affine CLT, `affine_skip_connection [d, d]`; and a `config.json`."""
    c = clt.cfg
    if c.architecture == "topk" or c.layer != 0:
        raise ValueError(
            f"{folder}: Gemma Scope 2's CLTs are JumpReLU over every layer from 0; {clt!r} is not"
        )
    L, d, m = clt.n_layers, c.d_in, c.d_sae
    files = {}
    for i in range(L):
        w_dec = torch.zeros(m, L, d, dtype=clt.dtype)
        w_dec[:, i:] = clt.W_dec[i].detach()
        threshold = clt.threshold[i] if c.architecture != "relu" else torch.zeros(m)
        tensors = {"w_enc": clt.W_enc[i], "w_dec": w_dec, "b_enc": clt.b_enc[i],
                   "b_dec": clt.b_dec[i], "threshold": threshold}  # fmt: skip
        if clt.W_skip is not None:
            tensors["affine_skip_connection"] = clt.W_skip[i]
        files[f"layer_{i}.safetensors"] = {
            k: t.detach().cpu().contiguous() for k, t in tensors.items()
        }
    config = {"architecture": "jump_relu", "model_name": c.model, "n_layers": L,
              "hf_hook_point_in": _HF_POINTS["mlp_in"], "hf_hook_point_out": _HF_POINTS["mlp_out"],
              "affine_connection": c.skip_connection, "gemmascope": our_fields(c)}  # fmt: skip
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        write_json(tmp / "config.json", config)
    return folder


def read_gemmascope2_clt(folder: Path, *, dtype: str | None = None) -> CLT:
    """Load a Gemma Scope 2 CLT folder (`layer_{i}.safetensors`, config.json optional)."""
    cfg_file = folder / "config.json"
    raw = read_json(cfg_file) if cfg_file.is_file() else {}
    n = sum(1 for _ in folder.glob("layer_*.safetensors"))
    layers = [read_safetensors(folder / f"layer_{i}.safetensors") for i in range(n)
              if (folder / f"layer_{i}.safetensors").is_file()]  # fmt: skip
    if len(layers) != n:
        raise ValueError(f"{folder}: layer files are not layer_0 .. layer_{n - 1}.safetensors")
    for i, state in enumerate(layers):
        check_names(state, ARRAYS, folder / f"layer_{i}.safetensors")
        w_dec = state.get("w_dec")
        if w_dec is None or w_dec.ndim != 3 or w_dec.shape[1] != n:
            raise ValueError(
                f"{folder / f'layer_{i}.safetensors'}: expected 'w_dec' of shape (d_sae, {n}, "
                f"d_model) for a {n}-layer CLT"
            )
    skip = all("affine_skip_connection" in s for s in layers)
    arrays = {"W_enc": torch.stack([s["w_enc"] for s in layers]),
              "b_enc": torch.stack([s["b_enc"] for s in layers]),
              "b_dec": torch.stack([s["b_dec"] for s in layers]),
              "threshold": torch.stack([s["threshold"] for s in layers]),
              **{f"W_dec_{i}": s["w_dec"][:, i:] for i, s in enumerate(layers)}}  # fmt: skip
    if skip:
        arrays["W_skip"] = torch.stack([s["affine_skip_connection"] for s in layers])
    d, m = arrays["W_enc"].shape[1:]
    fields = {"model": raw.get("model_name"), "layer": 0, "site": "mlp_in", "target_site": "mlp_out",
              **read_our_fields(raw, cfg_file)}  # fmt: skip
    try:
        cfg = SAEConfig(architecture="jumprelu", d_in=d, d_sae=m, n_layers=n, skip_connection=skip,
                        dtype=dtype or str(arrays["W_enc"].dtype).removeprefix("torch."), **fields)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return CLT.from_arrays(cfg, arrays, source=str(folder)).eval()
