"""Pieces shared by the readers: which format a folder holds, SAE ids in a tree, site names, files."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from gemmascope.common.files import read_json
from gemmascope.sae import DTYPES, SAEConfig, dtype_of

FORMATS: dict[str, str] = {
    "npz": "Gemma Scope (params.npz)",
    "saelens": "SAELens 6 (cfg.json + sae_weights.safetensors)",
    "gemmascope": 'gemmascope (cfg.json with "format": "gemmascope" + sae.safetensors)',
    "sparsify": "EleutherAI sparsify (cfg.json with d_in and k + sae.safetensors)",
    "dictionary_learning": "dictionary_learning (ae.pt + config.json)",
    "gemmascope2": "Gemma Scope 2 (params.safetensors + config.json)",
}
"""Every on-disk format `load` recognises, by the name `save` takes."""

SAE_FILES = frozenset(
    {
        "params.npz",
        "cfg.json",
        "sae.safetensors",
        "sae_weights.safetensors",
        "activation_scaler.json",
        "sparsity.safetensors",
        "ae.pt",
        "config.json",
        "params.safetensors",
    }
)
"""Files that belong to an SAE folder; `save` refuses to replace a folder holding anything else."""

ROOT_ID = "."
"""The sae_id of a source that is itself one SAE."""

# TransformerLens hook names (what SAELens stores) for our sites; `{L}` is the layer.
_HOOKS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_post": "blocks.{L}.hook_resid_post",
    "mlp_in": "blocks.{L}.hook_mlp_in",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_out": "blocks.{L}.hook_attn_out",
    "attn_z": "blocks.{L}.attn.hook_z",
}
_HOOK_RE = re.compile(
    r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_in|hook_mlp_out|hook_attn_out|attn\.hook_z)"
)


def site_to_hook(layer: int | None, site: str | None) -> str | None:
    """TransformerLens hook name of a site, or None when the site has no such name."""
    if layer is None or site not in _HOOKS:
        return None
    return _HOOKS[site].format(L=layer)


def hook_to_site(hook_name: str | None) -> tuple[int | None, str | None]:
    """(layer, site) of a TransformerLens hook name; (None, None) for names we have no site for."""
    m = _HOOK_RE.fullmatch(hook_name or "")
    if not m:
        return None, None
    site = next(s for s, h in _HOOKS.items() if h.endswith(m[2]))
    return int(m[1]), site


def format_of(names: Collection[str]) -> str | None:
    """The format a folder holding files `names` is in, judged by file names only.

    Ours and sparsify's share `cfg.json` + `sae.safetensors`; by name both are `gemmascope`, and
    `folder_format` tells them apart by the config's content.
    """
    if "params.npz" in names:
        return "npz"
    if "params.safetensors" in names:
        return "gemmascope2"
    if "ae.pt" in names:
        return "dictionary_learning"
    if "cfg.json" in names and "sae_weights.safetensors" in names:
        return "saelens"
    if "cfg.json" in names and "sae.safetensors" in names:
        return "gemmascope"
    return None


def folder_format(folder: Path) -> str | None:
    """The format of one SAE folder: by file names, then by cfg.json where names are shared."""
    fmt = format_of({p.name for p in folder.iterdir()})
    if fmt == "gemmascope":
        raw = read_json(folder / "cfg.json")
        if "format" not in raw and "d_in" in raw and ({"k", "expansion_factor"} & set(raw)):
            return "sparsify"  # sparsify's SparseCoderConfig + d_in; ours always carries "format"
    return fmt


def natural_key(s: str) -> list[Any]:
    """Sort `layer_2` before `layer_10`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def sae_ids_from_files(files: Iterable[str]) -> list[str]:
    """SAE ids (folders holding an SAE, `.` for the root) from relative POSIX file paths."""
    by_dir: dict[str, set[str]] = {}
    for f in files:
        parent, _, name = f.rpartition("/")
        by_dir.setdefault(parent or ROOT_ID, set()).add(name)
    return sorted((d for d, names in by_dir.items() if format_of(names)), key=natural_key)


def local_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under `folder`, hidden files and folders left out."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def resolve_sae_id(ids: list[str], sae_id: str | None, where: str) -> str:
    """Pick the SAE id to load from `ids`, or say clearly why none can be picked."""
    if sae_id is None or sae_id.strip("/") in ("", ROOT_ID):
        if ROOT_ID in ids or len(ids) == 1:
            return ROOT_ID if ROOT_ID in ids else ids[0]
        raise ValueError(
            f"{where}: holds {len(ids)} SAEs; pass sae_id to pick one, e.g. {ids[:5]} "
            f"(`gemmascope list-saes {where}` lists them all)"
        )
    wanted = sae_id.strip("/")
    if wanted in ids:
        return wanted
    close = difflib.get_close_matches(wanted, ids, n=5, cutoff=0.6) or ids[:5]
    raise ValueError(
        f"{where}: no SAE with sae_id {wanted!r}; close ones: {close} "
        f"({len(ids)} in all; `gemmascope list-saes {where}` lists them)"
    )


def no_format_error(folder: Path) -> ValueError:
    tried = "; ".join(FORMATS.values())
    seen = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f" and {len(seen) - 12} more" if len(seen) > 12 else ""
    return ValueError(
        f"{folder}: no SAE found. Tried {tried}; and folders of those below it. "
        f"Files seen: {seen[:12]}{more}. Pass a folder in one of these formats or a Hugging Face repo id"
    )


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical dtype name (`bfloat16`) for a torch dtype or a name, with a clear error."""
    if isinstance(dtype, str):
        dtype_of(dtype)
        return dtype.removeprefix("torch.")
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; choose one of {sorted(DTYPES)}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (never a pickle), or an error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: expected a safetensors file, could not read it ({e})") from None


_OURS = ("model", "layer", "site", "target_site", "hook_name", "dataset", "context_size",
         "tokens_trained")  # fmt: skip


def our_fields(cfg: SAEConfig) -> dict[str, Any]:
    """Our config fields that another format has no home for, kept under a `gemmascope` key."""
    return {**{k: getattr(cfg, k) for k in _OURS}, "extra": cfg.extra}


def read_our_fields(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """SAEConfig fields from the `gemmascope` key `our_fields` wrote, or an empty dict."""
    ours = raw.get("gemmascope") or {}
    allowed = {*_OURS, "extra"}
    if not isinstance(ours, dict) or set(ours) - allowed:
        raise ValueError(f'{source}: the "gemmascope" entry must hold only {sorted(allowed)}')
    return {k: v for k, v in ours.items() if v is not None}


def check_names(arrays: Collection[str], allowed: Collection[str], source: Path) -> None:
    """Refuse arrays we would otherwise ignore: dropping a tensor silently changes the SAE."""
    unexpected = sorted(set(arrays) - set(allowed))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected arrays {unexpected}; expected only {sorted(allowed)}. "
            "It may be another architecture (transcoder, gated SAE), which gemmascope does not load"
        )


def sae_dims(shapes: dict[str, tuple[int, ...]], names: dict[str, str]) -> tuple[int, int]:
    """(d_in, d_sae) as most of the arrays say, so a misshapen one is named, not its neighbours.

    `names` maps Gemma Scope's names (`W_enc`, `W_dec`, `b_enc`, `b_dec`, `threshold`) to this
    format's; each array present votes for the sizes along its axes.
    """
    axes = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",),
            "b_dec": ("d_in",), "threshold": ("d_sae",)}  # fmt: skip
    votes: dict[str, list[int]] = {"d_in": [], "d_sae": []}
    for ours, theirs in names.items():
        shape = shapes.get(theirs)
        if shape is not None and len(shape) == len(axes[ours]):
            for dim, size in zip(axes[ours], shape, strict=True):
                votes[dim].append(int(size))
    if not votes["d_in"] or not votes["d_sae"]:
        raise ValueError(f"cannot tell d_in and d_sae from arrays of shapes {shapes}")
    return tuple(max(set(v), key=v.count) for v in (votes["d_in"], votes["d_sae"]))  # type: ignore[return-value]
