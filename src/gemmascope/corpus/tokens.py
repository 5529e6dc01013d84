"""Faithful token text: the exact bytes each token adds to a text, and display strings per token.

`tokenizer.decode([id])` of a token that holds only part of a UTF-8 character is U+FFFD: Gemma's
SentencePiece byte-fallback pieces (`—` is `<0xE2><0x80><0x94>`) and the byte-level BPE pieces of
GPT-2, Llama 3 and Qwen (`東` can be `æ` + `Ŀ` + `±`) show as boxes when decoded one by one. Here
each token maps to its bytes instead, and a window's bytes are decoded together (`stitch`), so a
character split over tokens shows once, on the token that completes it.

The bytes are a token's bytes *inside* a text: decoders that drop the first token's leading space
(Llama 2's `Strip`, SentencePiece's dummy prefix) are not applied, since a window is cut from a
longer text. Special tokens keep their name (`<bos>`), as `decode([id])` writes it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from functools import cache
from typing import Any, Literal

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A SentencePiece byte-fallback piece: one raw byte of a character the vocabulary lacks."""
SPACE_PIECE = "▁"
"""SentencePiece's visible space (U+2581), a space in the decoded text."""
MAX_CONTINUATION = 3
"""UTF-8 continuation bytes a character can have (after its lead byte)."""
Mode = Literal["sentencepiece", "byte_level", "decode"]


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """The exact bytes each token contributes to the decoded text.

    Joined over an encoded text they give the UTF-8 of `tokenizer.decode(ids,
    skip_special_tokens=True)` (special tokens aside; with one more leading space where the decoder
    strips the first token's, see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer.
        ids: token ids.
    Returns:
        One `bytes` per id: byte-fallback pieces `<0xHH>` give that byte and `▁` a space
        (SentencePiece); byte-level BPE pieces map back through GPT-2's byte alphabet; anything else
        (special and added tokens, other tokenizers) is `tokenizer.decode([id])` in UTF-8.
    """
    mode = decoder_mode(tokenizer)
    if mode == "decode":
        return [_decoded(tokenizer, i) for i in ids]
    added = tokenizer.added_tokens_decoder  # special and user-added tokens: not model pieces
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    read = _sentencepiece_bytes if mode == "sentencepiece" else _byte_level_bytes
    out = []
    for i, piece in zip(ids, pieces, strict=True):
        found = None if piece is None or i in added else read(piece)
        out.append(_decoded(tokenizer, i) if found is None else found)
    return out


def stitch(pieces: Sequence[bytes], breaks: Sequence[bool] | None = None) -> list[str]:
    """One display string per token of a window, decoding the window's bytes as one UTF-8 stream.

    A character split over tokens shows on the token that completes it; the tokens before show ''.
    Continuation bytes at the very start (a character begun before the window) and an unfinished
    character at the very end (finished after it) show nothing. Only bytes that are invalid UTF-8
    become U+FFFD, on the token where the decoder finds them invalid.

    Args:
        pieces: each token's bytes (`token_bytes`), in order.
        breaks: per token, whether it is outside the text (BOS, EOS, padding): shown alone
            (`token_text`), with the text before it ending and the text after it starting there, as
            at the window's edges. A document that continues after a new BOS (`pack_sequences`)
            can resume in the middle of a character.
    Returns:
        One string per piece; those of each stretch between breaks join to its text.
    """
    breaks = [False] * len(pieces) if breaks is None else breaks
    out: list[str] = []
    run: list[bytes] = []
    for piece, outside in zip(pieces, breaks, strict=True):
        if outside:
            out += _stitch_run(run) + [token_text(piece)]
            run = []
        else:
            run.append(piece)
    return out + _stitch_run(run)


def _stitch_run(pieces: list[bytes]) -> list[str]:
    """`stitch` of a stretch of text with no breaks."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, skip, started = [], MAX_CONTINUATION, False
    for piece in pieces:
        if not started:
            n = 0
            while n < min(len(piece), skip) and 0x80 <= piece[n] <= 0xBF:
                n += 1
            skip -= n
            piece = piece[n:]
            started = bool(piece) or skip == 0
        out.append(decoder.decode(piece))
    return out  # bytes still buffered in `decoder` are the unfinished last character: dropped


def display_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display strings of a run of tokens (a window or a whole text): `stitch(token_bytes(...))`,
    the tokenizer's special tokens (BOS, EOS, ...) as breaks.

    Args:
        tokenizer: a Hugging Face tokenizer.
        ids: consecutive token ids.
    Returns:
        One string per id; '' for a token that only starts a character (see `stitch`).
    """
    special = special_token_ids(tokenizer)
    return stitch(token_bytes(tokenizer, ids), [i in special for i in ids])


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: markers, not text (`decode` can skip them)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return added | set(tokenizer.all_special_ids)


def token_text(piece: bytes) -> str:
    """One token's text out of context (a logit-lens token, a chip): UTF-8, with the bytes that do
    not make a whole character written as `<0xHH>`, as Gemma's vocabulary spells them, not U+FFFD.

    Args:
        piece: the token's bytes (`token_bytes`).
    Returns:
        Its text; `b"\\xe2\\x80"` gives `<0xE2><0x80>`.
    """
    out = []
    while True:
        try:
            out.append(piece.decode())
            return "".join(out)
        except UnicodeDecodeError as err:
            out.append(piece[: err.start].decode())
            out.extend(f"<0x{b:02X}>" for b in piece[err.start : err.end])
            piece = piece[err.end :]


def decoder_mode(tokenizer: Any) -> Mode:
    """How a tokenizer's pieces map to bytes, read from its decoder (what `decode` itself applies).

    Returns:
        `byte_level` (a `ByteLevel` decoder: GPT-2, Llama 3, Qwen), `sentencepiece` (`ByteFallback`,
        `Metaspace` or `▁` replaced by a space: Gemma, Llama 2, Mistral; or a SentencePiece model),
        else `decode` (each token decoded on its own).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else "decode"
    state = json.loads(backend.decoder.__getstate__())
    steps = state.get("decoders") or [state]  # a Sequence, or one decoder
    types = {step.get("type") for step in steps}
    replaces_space = any(
        step.get("type") == "Replace" and step.get("pattern", {}).get("String") == SPACE_PIECE
        for step in steps
    )
    if "ByteLevel" in types:
        return "byte_level"
    if replaces_space or types & {"ByteFallback", "Metaspace"}:
        return "sentencepiece"
    return "decode"


def _decoded(tokenizer: Any, i: int) -> bytes:
    return tokenizer.decode([i]).encode()


def _sentencepiece_bytes(piece: str) -> bytes:
    match = BYTE_PIECE.fullmatch(piece)
    return bytes([int(match[1], 16)]) if match else piece.replace(SPACE_PIECE, " ").encode()


def _byte_level_bytes(piece: str) -> bytes | None:
    """The bytes of a byte-level BPE piece, or None if it has a character outside the alphabet."""
    table = _byte_alphabet()
    if not all(c in table for c in piece):
        return None
    return bytes(table[c] for c in piece)


@cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted (character -> byte)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}
