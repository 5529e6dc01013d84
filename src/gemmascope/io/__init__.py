"""Load and save SAEs: Gemma Scope's `params.npz`, SAELens 6 folders and our own, on disk or the hub.

Every source ends in the local loader: a hub repo is first listed, then only the chosen SAE's files
are downloaded, and the folder they land in is read like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from gemmascope.io import hub
from gemmascope.io._common import (
    FORMATS,
    ROOT_ID,
    SAE_FILES,
    dtype_name,
    format_of,
    local_files,
    no_format_error,
    resolve_sae_id,
    sae_ids_from_files,
)
from gemmascope.io.gemmascope_npz import read_npz, write_npz
from gemmascope.io.native import read_native, write_native
from gemmascope.io.saelens import read_saelens, write_saelens
from gemmascope.sae import SAE

__all__ = ["FORMATS", "SaveFormat", "list_sae_ids", "load", "save"]

SaveFormat = Literal["gemmascope", "saelens", "npz"]


def load(
    source: str | Path,
    sae_id: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE from a file, a folder or a Hugging Face repo, detecting the format.

    Args:
        source: a Gemma Scope `params.npz`; an SAE folder in Gemma Scope's, SAELens 6's or our
            format; a folder holding several of those (e.g. a clone of a Gemma Scope repo); or a hub
            repo id such as `google/gemma-scope-2b-pt-res`. A local path wins over a repo id.
        sae_id: which SAE of a folder or repo holding several, e.g. `layer_20/width_16k/average_l0_71`.
        device: where to put the weights (default: cpu).
        dtype: dtype of the weights (default: the file's; bf16-free npz files give float32).

    Returns:
        The SAE in eval mode, so a batchtopk SAE encodes with its threshold.
    """
    name = dtype_name(dtype) if dtype is not None else None
    path = Path(source)
    if path.exists():
        sae = _load_local(path, sae_id, dtype=name)
    elif isinstance(source, str) and hub.is_repo_id(source):
        sae = _load_local(hub.fetch(source, sae_id), None, dtype=name, repo_hint=source)
    else:
        raise FileNotFoundError(
            f"{source}: no such file or folder, nor a Hugging Face repo id (`owner/name`); check the path"
        )
    if device is not None:
        sae = sae.to(device)
    return sae.eval()


def _load_local(
    path: Path, sae_id: str | None, *, dtype: str | None, repo_hint: str | None = None
) -> SAE:
    """Read one SAE from a local file or folder; the end point of every loader."""
    pick = sae_id.strip("/") if sae_id and sae_id.strip("/") not in ("", ROOT_ID) else None
    if path.is_file():
        if path.suffix == ".npz":
            if pick:
                raise ValueError(
                    f"{path}: is one SAE file; sae_id={sae_id!r} applies to folders and repos"
                )
            return read_npz(path, repo_hint=repo_hint, dtype=dtype)
        if path.name not in SAE_FILES:
            raise ValueError(
                f"{path}: expected a params.npz file or an SAE folder, found another file"
            )
        path = path.parent  # cfg.json or a weights file names its folder
    folder = path
    fmt = None if pick else format_of({p.name for p in folder.iterdir()})
    if fmt is None:
        direct = folder / pick if pick and ".." not in Path(pick).parts else None
        if direct is not None and direct.is_dir() and format_of({p.name for p in direct.iterdir()}):
            folder = direct
        else:
            ids = sae_ids_from_files(local_files(folder))
            if not ids:
                raise no_format_error(folder)
            folder = folder / resolve_sae_id(ids, pick, str(path))
        fmt = format_of({p.name for p in folder.iterdir()})
    if fmt == "npz":
        return read_npz(folder / "params.npz", repo_hint=repo_hint, dtype=dtype)
    if fmt == "saelens":
        return read_saelens(folder, dtype=dtype)
    return read_native(folder, dtype=dtype)


def list_sae_ids(source: str | Path) -> list[str]:
    """SAE ids in a local folder or hub repo, in natural order (`layer_2` before `layer_10`).

    Args:
        source: a folder or a Hugging Face repo id.

    Returns:
        The ids to pass as `sae_id`; `.` when the source is itself one SAE.
    """
    path = Path(source)
    if path.is_dir():
        ids = sae_ids_from_files(local_files(path))
        if not ids:
            raise no_format_error(path)
        return ids
    if path.exists():
        raise ValueError(f"{path}: is a file, which holds one SAE; pass a folder or a hub repo id")
    if isinstance(source, str) and hub.is_repo_id(source):
        return hub.list_hub_ids(source)
    raise FileNotFoundError(f"{source}: no such folder, nor a Hugging Face repo id (`owner/name`)")


def save(sae: SAE, path: str | Path, format: str = "gemmascope") -> Path:
    """Write `sae` atomically in one of `FORMATS`.

    Args:
        sae: the SAE to write; it is not modified (folding happens on a copy).
        path: the folder to write (`gemmascope`, `saelens`), or for `npz` a `.npz` file or a folder
            to hold `params.npz`. An existing folder is replaced only if it holds SAE files alone.
        format: `gemmascope` (lossless), `saelens` (SAELens 6 `load_from_disk`), or `npz` (Gemma
            Scope; input scale and b_dec subtraction folded in; topk refused).

    Returns:
        The folder, or the `.npz` file, written.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {list(FORMATS)}")
    if format == "npz":
        return write_npz(sae, path)
    if path.is_file():
        raise ValueError(
            f"{path}: is a file; format {format!r} writes a folder, pass a folder path"
        )
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in SAE_FILES)
        if others:
            raise ValueError(
                f"{path}: exists and holds {others[:5]}, which are not SAE files; saving replaces the "
                "whole folder. Choose a new path or empty it first"
            )
    return write_saelens(sae, path) if format == "saelens" else write_native(sae, path)
