"""Read Gemma Scope 2's `examples.safetensors` into a feature index, so a downloaded release is
browsable without indexing it again.

Each SAE folder of a Gemma Scope 2 repo (`google/gemma-scope-2-*`, `{site}[_all]/layer_{L}_width_{W}
_l0_{size}/`) holds `config.json`, `params.safetensors` and `examples.safetensors`. No model card
or repository documents the last; its layout here is what independent public code that reads the
released files checks (names, shapes and dtypes) and uses (the meaning of each tensor). The reader
verifies every name and shape before anything else. For `F` latents:

    activations          [F, E] float32   activation of each stored example (E = 1000)
    seq_ids              [F, E] int64     the example's row of `tokens`; < 0 marks an unused slot
    positions            [F, E] int32     its column of `tokens`
    tokens               [N, T] int32     the token ids the examples point into (e.g. 392802 x 256)
    top_tokens, bottom_tokens [F, 10] int32; top_logits, bottom_logits [F, 10] float32  logit lens
    feature_frequencies  [F] float64      how often each latent fires
    logit_effects        [F, E] float32   (transcoders only; not read here)

Only names and shapes are relied on: dtypes may be any integer or float, the examples need not be
sorted, and a slot counts when its `seq_ids` is >= 0 and its activation > 0. From these the index
gets each latent's `top_k` largest examples with a window of `window` tokens on each side (the
window's other activations are those of the latent's examples that fall inside it, 0 elsewhere),
its largest activation, its density (`feature_frequencies`) and its logit lens. What the file does
not hold stays empty and the index's meta says so under `not_derived`: how many tokens each latent
fired on and over how many tokens the frequencies were counted (`fired`, `tokens_indexed`: 0), the
activation histogram and the band samples below the top.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gemmascope
from gemmascope.common.config import check, option
from gemmascope.common.files import atomic_file, sha256_file
from gemmascope.corpus import special_ids
from gemmascope.corpus.tokens import token_text
from gemmascope.evaluate.feature_stats import token_decoder
from gemmascope.explore import store
from gemmascope.models import EMBEDDED_DEFAULT, load_model
from gemmascope.sae import SAE

INTS, FLOATS = ("int", "I", "U"), ("float", "F", "BF")
REQUIRED = {"activations": FLOATS, "seq_ids": INTS, "positions": INTS, "tokens": INTS,
            "top_tokens": INTS, "top_logits": FLOATS, "bottom_tokens": INTS,
            "bottom_logits": FLOATS, "feature_frequencies": FLOATS}  # fmt: skip
"""Each tensor the import reads, and the dtype kinds it may have (safetensors' names: I32, F64)."""
BLOCK = 256
"""Latents read and ranked at a time: bounds memory at any width."""
NOT_DERIVED = {
    "fired": "0: the file gives each latent's frequency, not a count of tokens",
    "tokens_indexed": "0: the file does not say over which tokens feature_frequencies was counted",
    "histogram": "empty: the file holds the top examples only, not the distribution",
    "bands": "none: the stored examples are the top ones, not samples of lower activations",
    "context acts": "a window's activations are those of the latent's stored examples inside it; "
    "other positions show 0 (not stored)",
}


@dataclass
class ExamplesImport:
    """One import of an examples file into a feature index."""

    examples: Path = option(positional=True)
    """Gemma Scope 2's examples.safetensors (in an SAE folder of a google/gemma-scope-2-* repo)."""
    out: Path = option(Path("index.sqlite"), required=True)
    """The index file to write (`gemmascope explore OUT` opens it)."""
    sae: str | None = None
    """The SAE the examples belong to (what `gemmascope.load` reads); default the examples file's
    folder, which in a release holds its params.safetensors and config.json."""
    model: str | None = None
    """The model the SAE reads, for the explorer's live pages: a folder, a hub name or
    `gemma-3-270m`; default the SAE config's model name."""
    tokenizer: str | None = None
    """Tokenizer that decodes the file's token ids (a folder or hub name); default --model."""
    top_k: int = option(20, ge=1)
    """Top examples kept per latent (of the file's 1000)."""
    window: int = option(16, ge=0)
    """Tokens kept on each side of an example's token."""
    overwrite: bool = False
    """Replace OUT if it exists."""

    def __post_init__(self) -> None:
        check(self)
        self.examples, self.out = Path(self.examples), Path(self.out)


@dataclass(frozen=True)
class ExamplesLayout:
    """The sizes of an examples file, read from its header."""

    n_features: int
    n_examples: int
    """Example slots per latent (E)."""
    lens_k: int
    n_sequences: int
    context_size: int
    extra: tuple[str, ...]
    """Tensors present but not read (e.g. `logit_effects`)."""


def read_layout(path: Path) -> ExamplesLayout:
    """Check an examples file's tensor names, kinds and shapes from its header; nothing is loaded.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a safetensors file, or not this layout (the message names what differs).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; name a Gemma Scope 2 examples.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            heads = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(h.get_shape()) for k, h in heads.items()}
            dtypes = {k: str(h.get_dtype()) for k, h in heads.items()}
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    missing = [k for k in REQUIRED if k not in shapes]
    if missing:
        raise ValueError(
            f"{path}: no tensor {missing} (found {sorted(shapes)}); expected Gemma Scope 2's "
            "examples.safetensors, which sits beside params.safetensors"
        )
    for name, kinds in REQUIRED.items():
        if not dtypes[name].startswith(kinds):
            raise ValueError(f"{path}: `{name}` is {dtypes[name]}, expected {kinds[0]}")
    (f_, e), lens = _dims(path, shapes, "activations", 2), _dims(path, shapes, "top_tokens", 2)
    want = {"seq_ids": (f_, e), "positions": (f_, e), "top_logits": lens, "bottom_tokens": lens,
            "bottom_logits": lens, "feature_frequencies": (f_,)}  # fmt: skip
    if lens[0] != f_:
        want["top_tokens"] = (f_, lens[1])
    for name, shape in want.items():
        if shapes[name] != shape:
            raise ValueError(
                f"{path}: `{name}` is {list(shapes[name])}, expected {list(shape)} "
                f"(`activations` is {[f_, e]}, `top_tokens` {list(lens)})"
            )
    n, t = _dims(path, shapes, "tokens", 2)
    extra = tuple(sorted(set(shapes) - set(REQUIRED)))
    return ExamplesLayout(f_, e, lens[1], n, t, extra)


def _dims(path: Path, shapes: dict[str, tuple[int, ...]], name: str, ndim: int) -> tuple[int, ...]:
    if len(shapes[name]) != ndim:
        raise ValueError(f"{path}: `{name}` is {list(shapes[name])}, expected {ndim} dimensions")
    return shapes[name]


def import_examples(
    examples: Path,
    out: Path,
    *,
    loaded_tokenizer: Any = None,
    loaded_sae: SAE | None = None,
    **options: Any,
) -> Path:
    """Write a feature index from a Gemma Scope 2 examples file (see the module docstring).

    Args:
        examples: the examples.safetensors file.
        out: the index file to write (atomically).
        loaded_tokenizer: the tokenizer, already loaded; default loaded from the `tokenizer` (or
            `model`) option.
        loaded_sae: the SAE, already loaded; default `gemmascope.load` of the `sae` option (or of
            the file's folder).
        **options: the other fields of `ExamplesImport` (`sae`, `model`, `top_k`, ...).
    Returns:
        `out`.
    """
    cfg = ExamplesImport(examples=Path(examples), out=Path(out), **options)
    if cfg.out.exists() and (cfg.out.is_dir() or not cfg.overwrite):
        raise FileExistsError(f"{cfg.out}: exists; pass --overwrite to replace it, or choose "
                              "another --out")  # fmt: skip
    layout = read_layout(cfg.examples)
    sae_source, sae = cfg.sae or str(cfg.examples.parent), loaded_sae
    if sae is None:
        from gemmascope import io

        loaded = io.load(sae_source)
        if not isinstance(loaded, SAE):
            raise ValueError(f"{sae_source}: a cross-layer transcoder; its examples are not read")
        sae = loaded
    if sae.cfg.d_sae != layout.n_features:
        raise ValueError(
            f"{cfg.examples} holds {layout.n_features:,} latents but the SAE {sae_source} has "
            f"{sae.cfg.d_sae:,}; pass --sae, the SAE the examples were made with"
        )
    if sae.cfg.layer is None or sae.cfg.site is None:
        raise ValueError(f"the SAE {sae_source} does not say where it reads (its config.json has "
                         "no hf_hook_point_in); the explorer needs its layer and site")  # fmt: skip
    model = cfg.model or sae.cfg.model
    if not model:
        raise ValueError(f"the SAE {sae_source} does not name its model; pass --model")
    tokenizer = loaded_tokenizer or _load_tokenizer(cfg.tokenizer or model)
    meta = _meta(cfg, layout, sae, sae_source, model, tokenizer)
    _write(cfg, layout, meta, tokenizer)
    return cfg.out


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    if name == EMBEDDED_DEFAULT:
        return load_model(name)[1]
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"could not load the tokenizer {name!r}: {err}; pass --tokenizer, a "
                           "folder written by save_pretrained or a hub name (needs the network "
                           "or a warm hub cache)") from err  # fmt: skip


def _meta(
    cfg: ExamplesImport, layout: ExamplesLayout, sae: SAE, source: str, model: str, tokenizer: Any
) -> dict[str, Any]:
    """The index's meta: what the explorer reads, where it came from, and what is missing."""
    local = Path(model).expanduser()
    l0 = sae.cfg.extra.get("gemmascope2", {}).get("l0") if sae.cfg.extra else None
    return {
        "model": str(local.resolve()) if local.exists() else model, "model_given": model,
        "sae_source": str(Path(source).resolve()) if Path(source).exists() else source,
        "sae_id": None, "sae_name": Path(source).name, "layer": sae.cfg.layer,
        "site": sae.cfg.site, "d_sae": sae.cfg.d_sae, "d_in": sae.cfg.d_in,
        "architecture": sae.cfg.architecture, "sae_sha256": sae.sha256(),
        "target_l0": l0 if isinstance(l0, int | float) else None,
        "corpus": "Gemma Scope 2 examples", "split": "all", "sequences": layout.n_sequences,
        "context_size": layout.context_size, "positions": layout.n_sequences * layout.context_size,
        "tokens_indexed": 0, "top_k": min(cfg.top_k, layout.n_examples), "window": cfg.window,
        "bands": 0, "samples": 0, "bins": 0, "lens_k": layout.lens_k,
        "special_ids": special_ids(tokenizer),
        "examples_file": str(cfg.examples.resolve()), "examples_sha256": sha256_file(cfg.examples),
        "examples_unread": list(layout.extra), "not_derived": NOT_DERIVED,
        "lens": "Gemma Scope 2's own top_tokens/top_logits and bottom_tokens/bottom_logits",
        "gemmascope_version": gemmascope.__version__,
    }  # fmt: skip


def _write(cfg: ExamplesImport, layout: ExamplesLayout, meta: dict, tokenizer: Any) -> None:
    """Read the file a block of latents at a time and write the index through one rename."""
    from safetensors import safe_open

    used: set[int] = set()
    with safe_open(str(cfg.examples), framework="pt") as f, atomic_file(cfg.out) as tmp:
        tokens = f.get_tensor("tokens")  # (N, T), kept in the file's dtype (up to ~0.5 GB)
        _check_vocab(f, tokens, tokenizer, cfg.examples)
        db = sqlite3.connect(tmp)
        try:
            db.executescript(store.SCHEMA)
            meta = {**meta, "format": store.FORMAT, "format_version": store.FORMAT_VERSION}
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [(k, _dumps(v)) for k, v in meta.items()])  # fmt: skip
            for start in range(0, layout.n_features, BLOCK):
                stop = min(start + BLOCK, layout.n_features)
                block = {k: f.get_slice(k)[start:stop] for k in REQUIRED if k != "tokens"}
                features, contexts, lens = _block_rows(cfg, block, tokens, start, used)
                db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)", features)
                db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               contexts)  # fmt: skip
                db.executemany("INSERT INTO lens_tokens VALUES (?, ?, ?)", lens)
            ids = sorted(used)
            vocab = zip(ids, token_decoder(tokenizer)(ids), strict=True)
            db.executemany("INSERT INTO vocab VALUES (?, ?, ?)",
                           [(i, token_text(p), p) for i, p in vocab])  # fmt: skip
            db.commit()
        finally:
            db.close()


def _block_rows(
    cfg: ExamplesImport, b: dict[str, torch.Tensor], tokens: torch.Tensor, start: int, used: set
) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """The features, contexts and lens_tokens rows of one block of latents."""
    acts, seq, pos = b["activations"].float(), b["seq_ids"].long(), b["positions"].long()  # (B, E)
    n, t = tokens.shape
    valid = (seq >= 0) & (acts > 0)
    bad = valid & ((seq >= n) | (pos < 0) | (pos >= t))
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{cfg.examples}: latent {start + i}'s example {j} points at sequence "
            f"{int(seq[i, j])} position {int(pos[i, j])}, outside `tokens` [{n}, {t}]; the file "
            "is damaged or not in Gemma Scope 2's layout"
        )
    k, w = min(cfg.top_k, acts.shape[1]), cfg.window
    vals, idx = acts.masked_fill(~valid, -torch.inf).topk(k, dim=1)  # (B, k), largest first
    s_top, p_top = seq.gather(1, idx), pos.gather(1, idx)  # (B, k)
    cols = p_top[..., None] + torch.arange(-w, w + 1)  # (B, k, 2w+1)
    inside = (cols >= 0) & (cols < t)
    win_tok = tokens[s_top.clamp(0, n - 1)[..., None], cols.clamp(0, t - 1)].long()
    win_tok = win_tok.where(inside, -1)  # (B, k, 2w+1), -1 off the sequence
    offset = pos[:, None, :] - p_top[..., None]  # (B, k, E): other examples, relative to this one
    near = valid[:, None, :] & (seq[:, None, :] == s_top[..., None]) & (offset.abs() <= w)
    others = torch.where(near, acts[:, None, :], 0.0)  # (B, k, E)
    win_act = torch.zeros(cols.shape).scatter_reduce_(2, (offset + w).clamp(0, 2 * w), others,
                                                      "amax")  # (B, k, 2w+1)  # fmt: skip
    features, contexts, lens = [], [], []
    for i in range(acts.shape[0]):
        fid = start + i
        top, max_act = _lens(b, i, "top", True), float(acts[i].where(valid[i], 0.0).max())
        lens += [(tok, fid, r) for r, (tok, _) in enumerate(top[: store.LENS_SEARCH_RANKS])]
        lens_json = {"top": top, "bottom": _lens(b, i, "bottom", False)}
        used.update(tok for side in lens_json.values() for tok, _ in side)
        features.append((fid, float(b["feature_frequencies"][i]), max_act, 0,
                         _dumps({"hi": 0.0, "counts": []}), _dumps(lens_json)))  # fmt: skip
        for r in range(k):
            if vals[i, r] > 0:
                where = (float(vals[i, r]), int(s_top[i, r]), int(p_top[i, r]))
                contexts.append(_context(fid, r, where, win_tok[i, r], win_act[i, r], w, used))
    return features, contexts, _unique(lens)


def _lens(b: dict[str, torch.Tensor], i: int, side: str, descending: bool) -> list[list[Any]]:
    """`[[token, logit], ...]` of one side, ordered as the index stores it (top descending,
    bottom ascending) whatever the file's order."""
    ids, values = b[f"{side}_tokens"][i].tolist(), b[f"{side}_logits"][i].float().numpy()
    order = np.argsort(-values if descending else values, kind="stable")
    rounded = _round(values[order])
    return [[int(ids[j]), v] for j, v in zip(order, rounded, strict=True)]


def _unique(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """One row per (token, latent), its best rank: a token may repeat in a lens."""
    best: dict[tuple[int, int], int] = {}
    for tok, fid, r in rows:
        best.setdefault((tok, fid), r)
    return [(tok, fid, r) for (tok, fid), r in best.items()]


def _context(
    fid: int,
    rank: int,
    where: tuple[float, int, int],
    toks: torch.Tensor,
    acts: torch.Tensor,
    w: int,
    used: set[int],
) -> tuple[Any, ...]:
    """A `contexts` row of the example at `where` (value, sequence, position), its window trimmed
    of the places off the sequence (as `store` does)."""
    value, sequence, position = where
    inside = (toks >= 0).numpy()
    lo, hi = int(inside.argmax()), len(inside) - int(inside[::-1].argmax())
    token_list = toks[lo:hi].tolist()
    used.update(token_list)
    return (fid, "top", -1, rank, value, w - lo, sequence, position, _dumps(token_list),
            _dumps(_round(acts[lo:hi].numpy())))  # fmt: skip


def _check_vocab(f: Any, tokens: torch.Tensor, tokenizer: Any, source: Path) -> None:
    """Refuse a tokenizer too small for the file's ids before anything is decoded."""
    lens = (int(f.get_tensor(k).max()) for k in ("top_tokens", "bottom_tokens"))
    largest = max(int(tokens.max()), *lens)
    if largest >= len(tokenizer):
        raise ValueError(f"{source} uses token id {largest} but the tokenizer has "
                         f"{len(tokenizer):,} tokens; pass --tokenizer, the tokenizer of the "
                         "model the SAE was trained on")  # fmt: skip


def _round(x: np.ndarray) -> list[Any]:
    """Four significant digits, to keep the JSON small; zeros stay exact (as `store` rounds)."""
    x = x.astype(np.float64)
    mag = np.where(x == 0, 1.0, 10.0 ** (3 - np.floor(np.log10(np.abs(np.where(x == 0, 1, x))))))
    return (np.round(x * mag) / mag + 0.0).tolist()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
