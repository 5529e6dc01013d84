"""Gemma Scope's `params.npz`: five float arrays per JumpReLU SAE, stored as
`layer_{L}/width_{W}/average_l0_{N}/params.npz` in repos such as `google/gemma-scope-2b-pt-res`.

The file holds weights only; model, layer and site come from the path, which is all Gemma Scope
publishes about them. Gemma Scope encodes `pre = x @ W_enc + b_enc`, `z = pre * (pre > threshold)`,
without subtracting `b_dec` and without rescaling the input.
"""

from __future__ import annotations

import copy
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmascope.common.files import atomic_file
from gemmascope.io._common import check_names, sae_dims, site_to_hook
from gemmascope.models import SITES as OUR_SITES
from gemmascope.sae import SAE, SAEConfig

ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
WIDTHS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
"""Gemma Scope's width labels are rounded powers of two."""
SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
"""Repo suffix -> site. `att` SAEs read the concatenated head outputs before `o_proj`, so their
width is n_heads * head_dim, not d_model."""
_REPO_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)$")
_SAE_DIR_RE = re.compile(r"(?:layer_(\d+)|embedding)/width_(\w+)/average_l0_(\d+)$")


def _repo_of(file: Path, repo_hint: str | None) -> re.Match[str] | None:
    """The Gemma Scope repo the file came from: the hint, or the nearest folder named like one
    (a clone `gemma-scope-2b-pt-res/` or a hub cache `models--google--gemma-scope-2b-pt-res/`)."""
    names = [repo_hint] if repo_hint else list(reversed(file.parent.parts))
    return next((m for n in names if (m := _REPO_RE.search(n))), None)


def describe(file: Path, repo_hint: str | None = None) -> dict[str, Any]:
    """SAEConfig fields that the path of a Gemma Scope `params.npz` tells."""
    info: dict[str, Any] = {"extra": {}}
    repo = _repo_of(file, repo_hint)
    if repo and repo[3] == "transcoders":
        raise ValueError(
            f"{file}: is a Gemma Scope transcoder (MLP input -> MLP output), not an SAE; "
            "gemmascope loads SAEs only"
        )
    m = _SAE_DIR_RE.search(file.parent.as_posix())
    if m:
        info["layer"] = int(m[1]) if m[1] is not None else None
        info["extra"].update(sae_id=m[0], width=m[2], average_l0=int(m[3]))
    if repo:
        size, variant, kind = repo.groups()
        info["model"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        info["extra"]["repo_id"] = f"google/{repo[0]}"
        if m and m[1] is not None:
            info["site"] = SITES[kind]
            info["hook_name"] = site_to_hook(info["layer"], SITES[kind])
        elif m and kind == "res":
            info["hook_name"] = "hook_embed"  # embedding SAEs: no layer, no site of ours
    elif m and m[1] is not None:
        # `gemmascope publish` lays suites out as {site}/layer_L/width_W/average_l0_N/params.npz.
        site_dir = file.parents[3].name if len(file.parents) > 3 else ""
        if site_dir in OUR_SITES:
            info["site"] = site_dir
            info["hook_name"] = site_to_hook(info["layer"], site_dir)
    return info


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as z:
            names = list(z.files)
            arrays = {}
            for name in names:
                try:
                    arrays[name] = z[name]
                except ValueError:  # numpy refuses object arrays without allow_pickle
                    raise ValueError(
                        f"{file}: array {name!r} holds Python objects, which only unpickling could "
                        "read; refusing to unpickle. Expected plain float arrays "
                        f"{list(ARRAYS)}; re-save them with numeric dtypes"
                    ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{file}: expected a numpy .npz archive, could not read it ({e})"
        ) from None
    return arrays


def read_npz(
    file: Path,
    *,
    repo_hint: str | None = None,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE:
    """Load a Gemma Scope `params.npz`; `repo_hint` is the hub repo id when known."""
    arrays = _read_arrays(file)
    check_names(arrays, ARRAYS, file)
    w_enc = arrays.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        shapes = {k: v.shape for k, v in arrays.items()}
        raise ValueError(f"{file}: expected array 'W_enc' of shape (d_in, d_sae); found {shapes}")
    d_in, d_sae = sae_dims({k: v.shape for k, v in arrays.items()}, {n: n for n in ARRAYS})
    info = describe(file, repo_hint)
    width = info["extra"].get("width")
    if width in WIDTHS and WIDTHS[width] != d_sae:
        raise ValueError(
            f"{file}: the folder says width_{width} ({WIDTHS[width]} latents) but W_enc has "
            f"{d_sae}; the file is not the SAE its path names"
        )
    file_dtype = w_enc.dtype.name if w_enc.dtype.name in ("float16", "float64") else "float32"
    cfg = SAEConfig(
        architecture="jumprelu", d_in=d_in, d_sae=d_sae, dtype=dtype or file_dtype, **info
    )
    return SAE.from_arrays(cfg, arrays, source=str(file), allow_nonfinite=allow_nonfinite)


def write_npz(sae: SAE, path: Path) -> Path:
    """Write `sae` as Gemma Scope's `params.npz` (at `path`, or `path/params.npz` for a folder).

    Gemma Scope's encoder has no input scale and no `b_dec` subtraction, so both are folded into the
    weights of a copy. relu is JumpReLU with threshold 0; batchtopk is saved in its inference form,
    a JumpReLU with its threshold (as SAELens does), so `k` is dropped. topk has no such form.
    """
    if sae.cfg.architecture == "topk":
        raise ValueError(
            f"{path}: a topk SAE cannot be saved as Gemma Scope params.npz, which has no `k` and "
            "only JumpReLU; save it with format='gemmascope' or 'saelens'"
        )
    file = path if path.suffix == ".npz" else path / "params.npz"
    s = copy.deepcopy(sae).fold_input_scale().fold_b_dec_into_b_enc()
    arrays = {}
    for name, t in s.state_arrays().items():
        t = t.cpu()
        arrays[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
    if s.cfg.architecture == "relu":
        arrays["threshold"] = np.zeros_like(arrays["threshold"])
    with atomic_file(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return file
