"""Token display: each token's exact bytes, windows stitched so split characters show whole, on real
tokenizers (Gemma 3's byte fallback, GPT-2 and Llama 3 style byte-level BPE, Llama 2's SentencePiece)
and through the feature index, version 1 included."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import build_tiny, tiny_tokenizer
from test_index import index_config, random_sae
from transformers import GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import gemmascope
from gemmascope.corpus.tokens import (
    BYTE_PIECE,
    decoder_mode,
    display_texts,
    stitch,
    token_bytes,
    token_text,
)
from gemmascope.evaluate.autointerp import Example
from gemmascope.evaluate.feature_stats import token_decoder
from gemmascope.explore.index import build_index
from gemmascope.explore.indexdb import IndexDB
from gemmascope.explore.store import FORMAT_VERSION
from gemmascope.explore.views import tok

TEXT = "naïve — 東京 🐋"
RARE = "𝔘 ℌ"  # not in Gemma's vocabulary: byte-fallback pieces
MORE = [
    " leading space\n\n\tTabs  and   spaces",
    "Привет, мир! 你好世界 🤖🧠👩‍👩‍👧",
    "<0x41> ▁ ▁▁ pieces",
]
B2U = bytes_to_unicode()


def joined(tokenizer: Any, ids: list[int]) -> bytes:
    return b"".join(token_bytes(tokenizer, ids))


def decoded(tokenizer: Any, ids: list[int]) -> bytes:
    """What `decode` makes of the whole text, special tokens and space clean-up left out."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.encode()


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's ids, special tokens (BOS) left out."""
    special = set(tokenizer.all_special_ids)
    return [i for i in tokenizer(text).input_ids if i not in special]


# ---------------------------------------------------------------- tokenizers built offline
def _bl(raw: bytes) -> str:
    return "".join(B2U[b] for b in raw)


def byte_level(cls: type) -> Any:
    """GPT-2 (`GPT2Tokenizer`) or Llama 3 style (`Qwen2Tokenizer`: split regex, NFC) byte-level BPE
    over the 256 byte symbols, with merges that cut characters: `Ġâ` (space + first byte of —),
    `ĢĶ` (its last two), `æĿ` (two bytes of 東), `ðŁ` (two of 🐋)."""
    vocab = {B2U[b]: b for b in range(256)}
    merges = [(_bl(b" "), _bl(b"\xe2")), (_bl(b"\x80"), _bl(b"\x94")), (_bl(b"\xe6"), _bl(b"\x9d")),
              (_bl(b"\xf0"), _bl(b"\x9f")), ("n", "a")]  # fmt: skip
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return cls(vocab=vocab, merges=merges)


def llama2() -> LlamaTokenizer:
    """Llama 2 style: byte fallback, `▁` prepended to the text and stripped again by `decode`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *map(chr, range(33, 127)), "▁n"]:
        vocab[piece] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[("▁", "n")])


def gemma_style(words: str) -> PreTrainedTokenizerFast:
    """Gemma's pipeline (spaces to `▁`, byte fallback, decoder `▁` -> space) over the characters of
    `words` and the bytes of — and 東 only: small enough for the tiny models' 64 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for piece in [f"<0x{b:02X}>" for b in "—東".encode()] + ["▁", *sorted(set(words))]:
        vocab.setdefault(piece, len(vocab))
    inner = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    inner.normalizer = normalizers.Replace(Regex(" "), "▁")
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")  # fmt: skip


@pytest.fixture(scope="module")
def gemma() -> Any:
    """Gemma 3's own tokenizer, from the embedded model (converted once into the cache)."""
    from transformers import AutoTokenizer

    from gemmascope.models import _embedded_folder

    try:
        return AutoTokenizer.from_pretrained(str(_embedded_folder()))
    except RuntimeError as err:  # the embedded model's package is missing
        pytest.skip(f"needs the embedded Gemma 3 270M: {err}")


# ---------------------------------------------------------------- real tokenizers
@pytest.mark.slow
def test_gemma_tokens_join_to_the_text_and_stitch_without_boxes(gemma: Any) -> None:
    assert decoder_mode(gemma) == "sentencepiece"
    text = f"{TEXT} {RARE}"
    ids = plain_ids(gemma, text)
    pieces = gemma.convert_ids_to_tokens(ids)
    assert sum(bool(BYTE_PIECE.fullmatch(p)) for p in pieces) >= 4, pieces  # byte fallback used
    assert any("\ufffd" in gemma.decode([i]) for i in ids)  # what the index used to store
    assert joined(gemma, ids) == decoded(gemma, ids) == text.encode()
    shown = display_texts(gemma, ids)
    assert "".join(shown) == text and "" in shown and not any("\ufffd" in s for s in shown)
    for more in MORE:
        ids = plain_ids(gemma, more)
        assert joined(gemma, ids) == decoded(gemma, ids)
        assert "".join(display_texts(gemma, ids)) == decoded(gemma, ids).decode()
    with_bos = gemma(TEXT).input_ids
    assert token_bytes(gemma, with_bos[:1]) == [b"<bos>"]  # special tokens keep their name


@pytest.mark.slow
def test_gemma_window_cut_inside_a_character_shows_no_box(gemma: Any) -> None:
    ids = plain_ids(gemma, f"a{RARE}b")  # a, <0xF0> <0x9D> <0x94> <0x98>, ▁, ℌ..., b
    pieces = gemma.convert_ids_to_tokens(ids)
    first = next(i for i, p in enumerate(pieces) if BYTE_PIECE.fullmatch(p))
    cut = display_texts(gemma, ids[first + 2 :])  # starts on 𝔘's third byte
    assert cut[:2] == ["", ""] and "".join(cut) == f"{RARE[1:]}b"
    end = display_texts(gemma, ids[: first + 2])  # ends on 𝔘's second byte
    assert end == ["a", "", ""]


@pytest.mark.parametrize("cls", [GPT2Tokenizer, Qwen2Tokenizer], ids=["gpt2", "llama3-style"])
def test_byte_level_tokens_join_to_the_text(cls: type) -> None:
    tokenizer = byte_level(cls)
    assert decoder_mode(tokenizer) == "byte_level"
    for text in [TEXT, *MORE]:
        ids = plain_ids(tokenizer, text)
        assert joined(tokenizer, ids) == decoded(tokenizer, ids) == text.encode()
        assert "".join(display_texts(tokenizer, ids)) == text
    ids = plain_ids(tokenizer, TEXT)
    assert tokenizer.convert_ids_to_tokens(ids)[5:7] == ["Ġâ", "ĢĶ"]  # — split after a space
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert display_texts(tokenizer, ids)[:7] == ["na", "", "ï", "v", "e", " ", "—"]
    assert display_texts(tokenizer, ids[6:]) == ["", " ", "", "東", "", "", "京", " ", "", "", "🐋"]


def test_llama2_tokens_keep_the_space_decode_strips() -> None:
    """Llama 2's decoder drops the first token's leading space (SentencePiece's dummy prefix); a
    window is cut from a longer text, so its tokens keep theirs."""
    tokenizer = llama2()
    assert decoder_mode(tokenizer) == "sentencepiece"
    ids = plain_ids(tokenizer, TEXT)
    assert joined(tokenizer, ids) == b" " + decoded(tokenizer, ids) == f" {TEXT}".encode()
    shown = display_texts(tokenizer, ids)
    assert "".join(shown) == f" {TEXT}" and shown[:4] == [" n", "a", "", "ï"]


def test_other_tokenizers_decode_each_token() -> None:
    words = tiny_tokenizer()
    assert decoder_mode(words) == "decode"
    ids = words("w3 w4").input_ids
    assert token_bytes(words, ids) == [words.decode([i]).encode() for i in ids] == [b"w3", b"w4"]


def test_token_decoder_gives_bytes_and_remembers() -> None:
    tokenizer = byte_level(GPT2Tokenizer)
    decode = token_decoder(tokenizer)
    ids = plain_ids(tokenizer, TEXT)
    assert decode(ids) == token_bytes(tokenizer, ids) and decode(ids[:2]) == [b"na", b"\xc3"]


# ---------------------------------------------------------------- stitching, known answers
@pytest.mark.parametrize(
    ("pieces", "shown"),
    [
        ([b"a\xe2", b"\x80", b"\x94b"], ["a", "", "—b"]),  # completed by the third token
        ([b"\x80\x94", b"x"], ["", "x"]),  # begun before the window: nothing, no box
        ([b"\x94", b"", b"\x9d\xb1", b"x"], ["", "", "", "x"]),  # up to 3 continuation bytes
        ([b"\x80\x80\x80\x80"], ["\ufffd"]),  # a fourth cannot belong to any character
        ([b"a", b"\xe6\x9d"], ["a", ""]),  # finished after the window: nothing
        ([b"\xff", b"a"], ["\ufffd", "a"]),  # invalid bytes only become U+FFFD
        ([b"\xe2", b"a"], ["", "\ufffda"]),  # found invalid on the next token
        ([b"x", b"\x80"], ["x", "\ufffd"]),  # a stray continuation byte inside the window
        ([], []),
    ],
)
def test_stitch_known_answers(pieces: list[bytes], shown: list[str]) -> None:
    assert stitch(pieces) == shown


def test_stitch_restarts_the_text_after_a_special_token() -> None:
    """`pack_sequences` continues a long document after a new BOS, maybe inside a character."""
    assert stitch([b"<bos>", b"\xb1", b" e"], [True, False, False]) == ["<bos>", "", " e"]
    assert stitch([b"a\xe2\x80", b"<eos>", b"\x94b"], [False, True, False]) == ["a", "<eos>", "b"]
    assert stitch([b"<bos>", b"\xb1"]) == ["<bos>", "\ufffd"]  # without the break: invalid
    with pytest.raises(ValueError):
        stitch([b"a"], [False, True])


def test_token_text_writes_loose_bytes_as_pieces() -> None:
    assert token_text(b"\xe2") == "<0xE2>"
    assert token_text(b" \xe2\x80") == " <0xE2><0x80>"
    assert token_text(b"\xff\xe2\x80\x94") == "<0xFF>—"
    assert token_text("東京".encode()) == "東京" and token_text(b"") == ""


def test_tok_filter_keeps_contexts_on_one_line() -> None:
    assert tok("a\r\nb\n\tc\r") == "a↵b↵⇥c␍"
    assert tok("") == "" and tok("", alone=True) == "∅" and tok(" x ") == " x "


def test_autointerp_marks_land_on_the_completing_token() -> None:
    ex = Example(["a", "", "—", "b"], [0.0, 1.0, 0.0, 0.0], threshold=0.5)
    assert ex.text(ex.active) == "a<<—>>b" and ex.text() == "a—b"


# ---------------------------------------------------------------- the feature index
@pytest.fixture(scope="module")
def split_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny index over a corpus full of — and 東, which the tokenizer spells byte by byte."""
    tmp = tmp_path_factory.mktemp("split-index")
    letters = "abcdefgh"
    tokenizer = gemma_style(letters)
    rng = np.random.default_rng(0)
    words = [*letters, "—", "東", "ab—", "東a"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) for _ in range(40)]
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model, sae = build_tiny("gemma3"), random_sae()
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    gemmascope.save(sae, tmp / "sae")
    assets = {"dir": tmp, "corpus": tmp / "corpus.jsonl"}
    cfg = index_config(assets, tmp / "index.sqlite")
    path = build_index(cfg, model=model, tokenizer=tokenizer, sae=sae, progress=False)
    return path, tokenizer


def contexts(db: IndexDB) -> list[dict[str, Any]]:
    out = []
    for fid in range(db.n_features):
        f = db.feature(fid)
        assert f is not None
        out += f["top_contexts"] + [c for b in f["bands"] for c in b["contexts"]]
    return out


def test_index_contexts_are_stitched(split_index: tuple[Path, Any]) -> None:
    path, tokenizer = split_index
    db = IndexDB(path)
    assert db.meta["format_version"] == FORMAT_VERSION == 2
    found = contexts(db)
    assert found
    for c in found:
        ids, texts = [t["id"] for t in c["tokens"]], [t["text"] for t in c["tokens"]]
        assert texts == display_texts(tokenizer, ids)
        assert not any("\ufffd" in t for t in texts)
    shown = "".join("".join(t["text"] for t in c["tokens"]) for c in found)
    assert "—" in shown and "東" in shown
    e2 = tokenizer.convert_tokens_to_ids("<0xE2>")
    assert db.token_texts([e2]) == {e2: "<0xE2>"}  # alone, a byte shows as its piece
    lens = [t["text"] for fid in range(db.n_features)
            for side in db.feature(fid)["logit_lens"].values() for t in side]  # fmt: skip
    assert not any("\ufffd" in t for t in lens)
    _, page = db.list_features(sort="id", per_page=db.n_features)
    for f in page:
        top = db.feature(f["id"])["top_contexts"][0]
        lo = top["peak"] - f["snippet"]["peak"]
        assert f["snippet"]["tokens"] == top["tokens"][lo : lo + len(f["snippet"]["tokens"])]


def test_version_1_index_still_reads(split_index: tuple[Path, Any], tmp_path: Path) -> None:
    """A version-1 file: no `bytes` column, each token's `decode([id])` as its text."""
    path, tokenizer = split_index
    old = tmp_path / "v1.sqlite"
    shutil.copy(path, old)
    with sqlite3.connect(old) as con:
        con.execute("ALTER TABLE vocab DROP COLUMN bytes")
        ids = [i for (i,) in con.execute("SELECT id FROM vocab")]
        con.executemany("UPDATE vocab SET text = ? WHERE id = ?",
                        [(tokenizer.decode([i]), i) for i in ids])  # fmt: skip
        con.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    db = IndexDB(old)
    assert db.meta["format_version"] == 1
    for c in contexts(db):
        assert [t["text"] for t in c["tokens"]] == [
            tokenizer.decode([t["id"]]) for t in c["tokens"]
        ]
    assert db.token_texts(ids[:3]) == {i: tokenizer.decode([i]) for i in ids[:3]}
    total, page = db.list_features(per_page=5)
    snippets = [f["snippet"] for f in page if f["snippet"]]
    assert total == db.n_features and snippets and all(t["text"] for t in snippets[0]["tokens"])
