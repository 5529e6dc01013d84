"""Load, save and convert SAEs: Gemma Scope's `params.npz` and Gemma Scope 2 folders, SAELens 6,
EleutherAI sparsify, dictionary_learning and our own, on disk or the hub.

Every source ends in the local loader: a hub repo is first listed, then only the chosen SAE's files
are downloaded, and the folder they land in is read like any other. Each format is one module with a
reader and a writer, registered in `_READERS` / `_WRITERS` below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from gemmascope.clt import CLT
from gemmascope.io import hub
from gemmascope.io._common import (
    FORMATS,
    ROOT_ID,
    SAE_FILES,
    dtype_name,
    folder_format,
    format_of,
    local_files,
    no_format_error,
    resolve_sae_id,
    sae_ids_from_files,
)
from gemmascope.io.circuit_tracer import (
    is_clt,
    is_transcoder_set,
    read_clt,
    read_transcoder_set,
    write_clt,
    write_transcoder_set,
)
from gemmascope.io.dictionary_learning import read_dictionary_learning, write_dictionary_learning
from gemmascope.io.gemmascope2 import (
    is_clt_folder,
    read_gemmascope2,
    read_gemmascope2_clt,
    write_gemmascope2,
    write_gemmascope2_clt,
)
from gemmascope.io.gemmascope_npz import read_npz, write_npz
from gemmascope.io.native import read_native, write_native
from gemmascope.io.saelens import read_saelens, write_saelens
from gemmascope.io.sparsify import read_sparsify, write_sparsify
from gemmascope.sae import SAE

__all__ = [
    "FORMATS",
    "SaveFormat",
    "convert",
    "list_sae_ids",
    "load",
    "load_transcoders",
    "save",
    "save_transcoders",
]

SaveFormat = Literal[
    "gemmascope", "saelens", "npz", "sparsify", "dictionary_learning", "gemmascope2"
]
_READERS: dict[str, Callable[..., SAE]] = {
    "saelens": read_saelens,
    "gemmascope": read_native,
    "sparsify": read_sparsify,
    "dictionary_learning": read_dictionary_learning,
    "gemmascope2": read_gemmascope2,
}
"""Format -> reader of one SAE folder; `npz` reads a file (whose path tells model and site) on its own."""
_WRITERS: dict[str, Callable[[SAE, Path], Path]] = {
    "saelens": write_saelens,
    "gemmascope": write_native,
    "sparsify": write_sparsify,
    "dictionary_learning": write_dictionary_learning,
    "gemmascope2": write_gemmascope2,
}
"""Format -> writer of one SAE folder; `npz` writes a file and is handled on its own."""


def load(
    source: str | Path,
    sae_id: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    allow_nonfinite: bool = False,
) -> SAE | CLT:
    """Load an SAE (or a cross-layer transcoder) from a file, a folder or a Hugging Face repo,
    detecting the format.

    Args:
        source: a Gemma Scope `params.npz`; an SAE folder in one of `FORMATS` (Gemma Scope, Gemma
            Scope 2, SAELens 6, sparsify, dictionary_learning, ours); a folder holding several of those (e.g. a clone of a Gemma Scope repo); or a hub
            repo id such as `google/gemma-scope-2b-pt-res`. A local path wins over a repo id.
        sae_id: which SAE of a folder or repo holding several, e.g. `layer_20/width_16k/average_l0_71`.
        device: where to put the weights (default: cpu).
        dtype: dtype of the weights (default: the file's; bf16-free npz files give float32).
        allow_nonfinite: load weights holding NaN or inf (refused by default: such an SAE computes
            NaNs) to look at them.

    Returns:
        The SAE in eval mode, so a batchtopk SAE encodes with its threshold.
    """
    name = dtype_name(dtype) if dtype is not None else None
    path = Path(source)
    if path.exists():
        sae = _load_local(path, sae_id, dtype=name, allow_nonfinite=allow_nonfinite)
    elif isinstance(source, str) and hub.is_repo_id(source):
        sae = _load_local(hub.fetch(source, sae_id), None, dtype=name, repo_hint=source,
                          allow_nonfinite=allow_nonfinite)  # fmt: skip
    else:
        raise FileNotFoundError(
            f"{source}: no such file or folder, nor a Hugging Face repo id (`owner/name`); check the path"
        )
    if device is not None:
        sae = sae.to(device)
    return sae.eval()


def _load_local(
    path: Path, sae_id: str | None, *, dtype: str | None, repo_hint: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE | CLT:  # fmt: skip
    """Read one SAE from a local file or folder; the end point of every loader."""
    if path.is_dir() and not sae_id:  # a CLT in circuit-tracer's or Gemma Scope 2's layout
        if is_clt(path):
            return read_clt(path, dtype=dtype)
        if is_clt_folder(path):
            return read_gemmascope2_clt(path, dtype=dtype)
    folder, fmt = _locate(path, sae_id)
    if fmt == "npz":
        file = path if path.is_file() and path.suffix == ".npz" else folder / "params.npz"
        return read_npz(file, repo_hint=repo_hint, dtype=dtype, allow_nonfinite=allow_nonfinite)
    return _READERS[fmt](folder, dtype=dtype, allow_nonfinite=allow_nonfinite)


def _locate(path: Path, sae_id: str | None) -> tuple[Path, str]:
    """The folder of the one SAE that `path` and `sae_id` name, and its format."""
    pick = sae_id.strip("/") if sae_id and sae_id.strip("/") not in ("", ROOT_ID) else None
    if path.is_file():
        if pick:
            raise ValueError(
                f"{path}: is one SAE file; sae_id={sae_id!r} applies to folders and repos"
            )
        if path.suffix == ".npz":
            return path.parent, "npz"
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
    fmt = folder_format(folder)
    if fmt is None:
        raise no_format_error(folder)
    return folder, fmt


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


def save(sae: SAE | CLT, path: str | Path, format: str = "gemmascope") -> Path:
    """Write `sae` atomically in one of `FORMATS`.

    Args:
        sae: the SAE to write; it is not modified (folding happens on a copy). A cross-layer
            transcoder (`CLT`) writes as `gemmascope`, `gemmascope2` (a `clt/...` folder of
            `layer_{i}.safetensors`) or `circuit_tracer` (its `W_enc_{i}`/`W_dec_{i}` files).
        path: the folder to write, or for `npz` a `.npz` file or a folder to hold `params.npz`.
            An existing folder is replaced only if it holds SAE files alone.
        format: `gemmascope` (lossless), `saelens` (SAELens 6 `load_from_disk`), `npz` (Gemma
            Scope; input scale and b_dec subtraction folded in; topk refused), `gemmascope2` (the
            same as `params.safetensors` + `config.json`), `sparsify` (topk only; name the folder
            after the hookpoint, e.g. `layers.6`), or `dictionary_learning` (`ae.pt` +
            `config.json`). A conversion that would change the encodings is refused, saying why.

    Returns:
        The folder, or the `.npz` file, written.
    """
    path = Path(path)
    if isinstance(sae, CLT):
        return _save_clt(sae, path, format)
    if format == "circuit_tracer":
        raise ValueError(
            f"{path}: circuit-tracer's format holds a set of transcoders, one per layer; write it "
            "with `save_transcoders(saes, folder)` (or `gemmascope convert RUN DEST --to circuit_tracer`)"
        )
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
    return _WRITERS[format](sae, path)


def _save_clt(clt: CLT, path: Path, format: str) -> Path:
    writers = {"gemmascope": write_native, "gemmascope2": write_gemmascope2_clt,
               "circuit_tracer": write_clt}  # fmt: skip
    if format not in writers:
        raise ValueError(
            f"{path}: a cross-layer transcoder saves as {sorted(writers)}, not {format!r}"
        )
    if (
        path.is_dir()
        and any(path.iterdir())
        and not (folder_format(path) == "gemmascope" or is_clt(path) or is_clt_folder(path))
    ):
        raise ValueError(
            f"{path}: exists and holds files that are not a CLT's; saving replaces the whole "
            "folder. Choose a new path or empty it first"
        )
    return writers[format](clt, path)


def convert(
    source: str | Path,
    dest: str | Path,
    to: str,
    *,
    sae_id: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Read an SAE in any format `load` detects and write it in format `to`, encodings unchanged.

    Args:
        source: a file, folder or hub repo id, as for `load`.
        dest: the folder (or `.npz` file) to write, as for `save`.
        to: one of `FORMATS`.
        sae_id: which SAE of a source holding several.
        dtype: dtype to convert the weights to (default: the source's).

    Returns:
        The folder, or the `.npz` file, written.

    A TopK SAE trained into `runs/sweep1/layer_6_resid_post_w4096_topk_k32` becomes a sparsify folder
    with `convert(that_folder, "out/layers.6", to="sparsify")` (README, "Convert between formats",
    runs that example in the tests).
    """
    if to == "circuit_tracer":  # a set: every transcoder of the source, or its CLT
        found = load_transcoders(source, sae_id, dtype=dtype)
        return (
            save(found, dest, "circuit_tracer")
            if isinstance(found, CLT)
            else save_transcoders(found, dest)
        )
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}; choose one of {[*FORMATS, 'circuit_tracer']}")
    return save(load(source, sae_id, dtype=dtype), dest, format=to)


def load_transcoders(
    source: str | Path, pick: str | None = None, *, dtype: torch.dtype | str | None = None
) -> list[SAE] | CLT:
    """The MLP transcoders (`mlp_in -> mlp_out`) of a folder: one per layer, layer 0 first, or one
    cross-layer transcoder.

    Args:
        source: a circuit-tracer transcoder set or CLT, a Gemma Scope 2 CLT folder, or any folder
            holding SAE folders in the formats `load` reads (a training run, a clone of a Gemma
            Scope 2 repo's `transcoder_all`).
        pick: keep only the SAE ids containing this text, e.g. `width_16k_l0_small` (or `clt`),
            when the folder holds several transcoders per layer (or a CLT beside them).
        dtype: dtype of the weights (default: the files').
    """
    path = Path(source)
    name = dtype_name(dtype) if dtype is not None else None
    if is_transcoder_set(path):
        return read_transcoder_set(path, dtype=name)
    if is_clt(path) or is_clt_folder(path):
        return load(path, dtype=name)  # type: ignore[return-value]
    ids = [i for i in list_sae_ids(path) if pick is None or pick in i]
    by_layer: dict[int, list[tuple[str, SAE]]] = {}
    clts: list[tuple[str, CLT]] = []
    for sae_id in ids:
        sae = load(path, sae_id, dtype=name)
        if (sae.cfg.site, sae.cfg.target_site) != ("mlp_in", "mlp_out") or sae.cfg.layer is None:
            continue
        if isinstance(sae, CLT):
            clts.append((sae_id, sae))
        else:
            by_layer.setdefault(sae.cfg.layer, []).append((sae_id, sae))
    if clts and (by_layer or len(clts) > 1):
        found = [i for i, _ in clts] + [i for f in by_layer.values() for i, _ in f][:2]
        raise ValueError(
            f"{path}: holds {len(clts)} cross-layer transcoder(s) and {len(by_layer)} layers of "
            f"one-layer transcoders ({found[:4]}); pass `pick` (--pick) with text naming one CLT "
            "(e.g. `clt_`) or one transcoder per layer"
        )
    if clts:
        return clts[0][1]
    if not by_layer:
        raise ValueError(
            f"{path}: holds no MLP transcoder (mlp_in -> mlp_out){f' matching {pick!r}' if pick else ''}; "
            "train them with `gemmascope train --sites mlp_in --target-site mlp_out`"
        )
    several = {layer: [i for i, _ in found] for layer, found in by_layer.items() if len(found) > 1}
    if several:
        layer, found = next(iter(sorted(several.items())))
        raise ValueError(
            f"{path}: layer {layer} has {len(found)} transcoders ({found[:3]}); pass `pick` "
            "(--pick) with text that names one per layer"
        )
    return [by_layer[layer][0][1] for layer in sorted(by_layer)]


def save_transcoders(saes: list[SAE], folder: str | Path, format: str = "circuit_tracer") -> Path:
    """Write MLP transcoders, one per layer, as one folder: circuit-tracer's transcoder set."""
    if format != "circuit_tracer":
        raise ValueError(f"unknown transcoder-set format {format!r}; choose 'circuit_tracer'")
    return write_transcoder_set(saes, Path(folder))
