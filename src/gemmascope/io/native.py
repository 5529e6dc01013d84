"""Our own format: one folder with `cfg.json` (SAEConfig + format tag) and `sae.safetensors`.

The `format` tag tells our folders apart from EleutherAI sparsify's (`io/sparsify.py`), which use the
same file names.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmascope.clt import CLT
from gemmascope.common.files import atomic_dir, read_json, write_json
from gemmascope.io._common import check_names, read_safetensors
from gemmascope.sae import SAE, SAEConfig

FORMAT = "gemmascope"
FORMAT_VERSION = 1
_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip")


def write_native(sae: SAE | CLT, folder: Path) -> Path:
    """Write `sae` (or a CLT) losslessly (all config fields, weights in their dtype) to `folder`."""
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **sae.cfg.to_dict()}
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise ValueError(
            f"{folder}: cfg.extra must hold only JSON values to be saved ({e})"
        ) from None
    tensors = {n: t.detach().cpu().contiguous() for n, t in sae.state_arrays().items()}
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / "sae.safetensors", metadata={"format": FORMAT})
        write_json(tmp / "cfg.json", cfg)
    return folder


def read_native(
    folder: Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE | CLT:
    """Load a folder written by `write_native`; `dtype` overrides the saved one."""
    cfg_file, weights = folder / "cfg.json", folder / "sae.safetensors"
    raw = read_json(cfg_file)
    fmt, version = raw.pop("format", None), raw.pop("format_version", None)
    if fmt != FORMAT:
        raise ValueError(
            f'{cfg_file}: expected "format": "{FORMAT}" beside sae.safetensors, found {fmt!r}. '
            "(an EleutherAI sparsify folder, with the same file names, has `d_in` and `k` instead)"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format_version {version!r}, this gemmascope reads version {FORMAT_VERSION}; "
            "upgrade gemmascope to read it"
        )
    if dtype:
        raw["dtype"] = dtype
    try:
        cfg = SAEConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    state = read_safetensors(weights)
    if cfg.n_layers is not None:
        return CLT.from_arrays(cfg, state, source=str(weights), allow_nonfinite=allow_nonfinite)
    check_names(state, _WEIGHTS, weights)
    return SAE.from_arrays(cfg, state, source=str(weights), allow_nonfinite=allow_nonfinite)
