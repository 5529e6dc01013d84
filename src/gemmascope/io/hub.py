"""Hugging Face Hub sources: list the repo, download only the chosen SAE's files, hand back a folder.

The local loader does all the reading, so the hub adds nothing but the two network calls below.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from gemmascope.io._common import ROOT_ID, SAE_FILES, resolve_sae_id, sae_ids_from_files

_NEEDED = SAE_FILES - {"sparsity.safetensors"}
"""Files of an SAE folder that loading reads."""
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(source: str) -> bool:
    """Whether `source` has the shape of a hub repo id (`owner/name`)."""
    return bool(_REPO_ID_RE.fullmatch(source))


def repo_files(repo_id: str) -> list[str]:
    """All file paths in a hub repo, with a clear error when the hub cannot be reached."""
    import huggingface_hub

    try:
        return list(huggingface_hub.list_repo_files(repo_id))
    except Exception as e:  # any hub or network failure; re-raised with what to check
        raise RuntimeError(
            f"{repo_id}: not a local path, and listing it as a Hugging Face repo failed "
            f"({type(e).__name__}: {e}). Check the path, the repo name, the network, and HF_TOKEN "
            "for gated repos"
        ) from e


def _ids(repo_id: str, files: list[str]) -> list[str]:
    ids = sae_ids_from_files(files)
    if not ids:
        raise ValueError(
            f"{repo_id}: no SAE folder found in this Hugging Face repo (looked for params.npz, or "
            f"cfg.json beside sae_weights.safetensors or sae.safetensors); files: {sorted(files)[:12]}"
        )
    return ids


def list_hub_ids(repo_id: str) -> list[str]:
    """SAE ids in a hub repo (folders holding an SAE in a format we read)."""
    return _ids(repo_id, repo_files(repo_id))


def fetch(repo_id: str, sae_id: str | None) -> Path:
    """Download the files of one SAE of `repo_id`; return the local folder that holds them."""
    files = repo_files(repo_id)
    sid = resolve_sae_id(_ids(repo_id, files), sae_id, repo_id)
    prefix = "" if sid == ROOT_ID else f"{sid}/"
    wanted = [f for f in files if f.startswith(prefix) and f[len(prefix) :] in _NEEDED]
    import huggingface_hub

    try:
        # Escaped: the patterns are exact paths, and folder names may hold glob characters.
        root = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[glob.escape(f) for f in wanted]
        )
    except Exception as e:  # any hub or network failure; re-raised with what to check
        raise RuntimeError(
            f"{repo_id}: downloading {wanted} failed ({type(e).__name__}: {e}); "
            "check the network and HF_TOKEN for gated repos"
        ) from e
    assert isinstance(root, str)  # a list only in dry_run mode
    return Path(root) / prefix
