"""The explorer's outer wall, before any route: allowed Host names only (no DNS rebinding), bounded
bodies, request bodies only as JSON and only from the explorer's own pages (a page on another site
can send a POST without a CORS preflight, but not with a JSON content type, and browsers say where a
request came from in `Sec-Fetch-Site`), HEAD as GET, a JSON 500, and the security headers on every
response, errors included."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
"""Second line of defence after escaping: no inline or foreign script can run on these pages."""
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))  # fmt: skip
"""Sent with every response, errors included."""
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
"""The Host header names served by default: this machine only."""


class Guard:
    """ASGI middleware, before any route: 400 for a Host header not in `hosts` (DNS rebinding), 413
    for a body over `limit` (declared or streamed), HEAD answered as GET without the body, a JSON 500
    for an unhandled exception, and `SECURITY_HEADERS` on every response."""

    def __init__(self, app: Any, limit: int, hosts: Sequence[str]) -> None:
        self.app, self.limit = app, limit
        self.hosts = frozenset(_normal_host(h) for h in hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, head = dict(scope["headers"]), scope["method"] == "HEAD"
        raw_host = headers.get(b"host", b"").decode("latin-1")
        if _host_name(raw_host) not in self.hosts:
            shown = raw_host[:100]
            return await _reply(send, 400, f"host {shown!r} is not allowed: this explorer answers to "
                                           f"{', '.join(sorted(self.hosts))}; to serve it under that "
                                           f"name too, start it with `gemmascope explore --host NAME`", head)  # fmt: skip
        too_large = f"request body over {self.limit} bytes; send less"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _reply(send, 413, too_large, head)
        if scope["method"] not in ("GET", "HEAD"):
            site = headers.get(b"sec-fetch-site", b"same-origin")
            if site not in (b"same-origin", b"none"):
                return await _reply(send, 403, "requests from other sites are refused; use the "
                                               "explorer's own pages or a client of your own", head)  # fmt: skip
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return await _reply(send, 415, "send the request body as JSON (Content-Type: "
                                               "application/json)", head)  # fmt: skip
        if head:
            scope = {**scope, "method": "GET"}
        started = False
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a body without Content-Length: the route answers 413
                raise HTTPException(413, too_large)
            return message

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = _with_security_headers(message.get("headers", []))
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception:
            if not started:
                await _reply(send, 500, "internal error in the explorer; see its log", head)
            raise  # for the server to log (Starlette's own 500 sees a response already sent)


def _with_security_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    names = {name for name, _ in SECURITY_HEADERS}
    return [*(h for h in headers if h[0].lower() not in names), *SECURITY_HEADERS]


async def _reply(send: Any, status: int, detail: str, head: bool = False) -> None:
    """A JSON `{"detail": ...}` response, security headers included, straight from the middleware."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": _with_security_headers([(b"content-type", b"application/json"),
                                                   (b"content-length", str(len(body)).encode())])})  # fmt: skip
    await send({"type": "http.response.body", "body": b"" if head else body})


def _host_name(header: str) -> str | None:
    """The host of a Host header, port stripped and brackets off an IPv6 address; None if malformed."""
    value = header.strip()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or not port.isascii():
        return None
    return _normal_host(name)


def _normal_host(name: str) -> str:
    """Case-insensitive, one trailing dot (the DNS root) ignored, `[::1]` as `::1`."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name[:-1] if name.endswith(".") else name
