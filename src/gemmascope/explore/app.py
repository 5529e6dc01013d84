"""The explorer: a local web app over one feature index, with its JSON API under `/api`.

Pages are rendered on the server by Jinja2 with autoescaping, and the little JavaScript there is
builds the DOM with `textContent`, so token text never becomes markup. Every asset is served from this
package. Request bodies, texts, strengths and generation lengths are bounded; an unknown feature is a
404 naming the valid range, a number out of range in a query a 422. No request ever names a file: the
index is fixed when the app is made. Only requests whose Host header names an allowed host are served
(a web page cannot reach the explorer by rebinding its own domain name to 127.0.0.1), every response
carries the security headers, and HEAD works wherever GET does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from gemmascope.explore.live import InputError, Live
from gemmascope.explore.store import IndexDB, feature_id_query
from gemmascope.explore.views import histogram_bars, register_filters

HERE = Path(__file__).parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
"""Second line of defence after escaping: no inline or foreign script can run on these pages."""
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))  # fmt: skip
"""Sent with every response, errors included."""
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
"""The Host header names served by default: this machine only."""
MAX_BODY = 64 * 1024
"""Largest request body accepted (bytes); larger ones get 413."""
MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 64
MAX_STRENGTH = 10_000.0
PER_PAGE = 50


Sort = Annotated[Literal["id", "density", "max_act"], Query()]
Order = Annotated[Literal["asc", "desc"], Query()]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
Search = Annotated[str, Query(max_length=100)]


class FiresRequest(BaseModel):
    """Body of `POST /api/fires`."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    top: int = Field(default=5, ge=1, le=20)


class SteerRequest(BaseModel):
    """Body of `POST /api/steer`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    feature: int = Field(ge=0)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    max_new_tokens: int = Field(default=24, ge=1, le=MAX_NEW_TOKENS)


class _Guard:
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


def create_app(
    index: str | Path,
    *,
    live: Live | None = None,
    device: str = "cpu",
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> FastAPI:
    """Build the explorer for one index file.

    Args:
        index: the `.sqlite` file written by `gemmascope index`.
        live: the model and SAE for "what fires here" and steering; default loaded lazily from the
            index's meta on first use.
        device: where that lazy load puts them.
        hosts: the names a request's Host header may give (port aside; case-insensitive); any other
            gets 400, so a web page cannot reach this server by rebinding its domain to 127.0.0.1.
    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    db = IndexDB(index)
    live = live or Live(db.meta, device=device)
    # No /docs: Swagger UI would load its assets from a CDN.
    app = FastAPI(title="gemmascope explorer", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, limit=MAX_BODY, hosts=hosts)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    register_filters(templates.env)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"meta": db.meta, **context},
                                          status_code=status)  # fmt: skip

    def get_feature(fid: int) -> dict[str, Any]:
        feature = db.feature(fid) if 0 <= fid < db.n_features else None
        if feature is None:
            raise HTTPException(404, f"feature {fid} does not exist; this index has features "
                                     f"0..{db.n_features - 1}")  # fmt: skip
        return feature

    def checked_query(q: str) -> str:
        """A search naming a feature id beyond this index: 422 with the range."""
        fid = feature_id_query(q)
        if fid is not None and fid >= db.n_features:
            raise HTTPException(422, f"q: there is no feature {fid}; this index has features "
                                     f"0..{db.n_features - 1}")  # fmt: skip
        return q

    def lens_summary(ids: list[int]) -> dict[int, dict[str, Any]]:
        """What the index knows of each id for a list of features: one connection, no contexts."""
        return {fid: {"density": s["density"], "index_max_act": s["max_act"],
                      "lens_top": s["lens_top"]}
                for fid, s in db.summaries(ids, top=5).items()}  # fmt: skip

    # ------------------------------------------------------------ JSON API
    @app.get("/api/meta")
    def api_meta() -> dict[str, Any]:
        return {**db.meta, "n_features": db.n_features}

    @app.get("/api/features")
    def api_features(sort: Sort = "density", order: Order = "desc", page: PageNo = 1,
                     per_page: Annotated[int, Query(ge=1, le=200)] = PER_PAGE,
                     q: Search = "") -> dict[str, Any]:  # fmt: skip
        total, features = db.list_features(sort=sort, descending=order == "desc", page=page,
                                           per_page=per_page, query=checked_query(q))  # fmt: skip
        return {"total": total, "page": page, "per_page": per_page, "features": features}

    @app.get("/api/features/{fid}")
    def api_feature(fid: int) -> dict[str, Any]:
        return get_feature(fid)

    @app.post("/api/fires")
    def api_fires(body: FiresRequest) -> dict[str, Any]:
        result = _serve(lambda: live.fires(body.text, top=body.top))
        summary = lens_summary([f["id"] for f in result["features"]])
        for f in result["features"]:
            f.update(summary.get(f["id"], {}))
        return result

    @app.post("/api/steer")
    def api_steer(body: SteerRequest) -> dict[str, Any]:
        get_feature(body.feature)
        return _serve(lambda: live.steer(body.prompt, body.feature, body.strength,
                                         body.max_new_tokens))  # fmt: skip

    # ------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse)
    def list_page(request: Request, sort: Sort = "density", order: Order = "desc",
                  page: PageNo = 1, q: Search = "") -> HTMLResponse:  # fmt: skip
        try:
            checked_query(q)
        except HTTPException as err:
            return render(request, "error.html", status=err.status_code, message=err.detail)
        total, features = db.list_features(sort=sort, descending=order == "desc", page=page,
                                           per_page=PER_PAGE, query=q)  # fmt: skip
        pages = max(1, -(-total // PER_PAGE))
        return render(request, "list.html", features=features, total=total, page=page,
                      pages=pages, sort=sort, order=order, q=q)  # fmt: skip

    @app.get("/features/{fid}", response_class=HTMLResponse)
    def feature_page(request: Request, fid: int) -> HTMLResponse:
        try:
            feature = get_feature(fid)
        except HTTPException as err:
            return render(request, "error.html", status=404, message=err.detail)
        bars = histogram_bars(feature["histogram"], feature["max_act"])
        return render(request, "feature.html", f=feature, bars=bars)

    @app.get("/fires", response_class=HTMLResponse)
    def fires_page(request: Request) -> HTMLResponse:
        return render(request, "fires.html", max_chars=MAX_TEXT_CHARS)

    @app.get("/steer", response_class=HTMLResponse)
    def steer_page(request: Request,
                   feature: Annotated[int, Query(ge=0)] = 0) -> HTMLResponse:  # fmt: skip
        if feature >= db.n_features:
            return render(request, "error.html", status=422,
                          message=f"feature: there is no feature {feature}; this index has "
                                  f"features 0..{db.n_features - 1}")  # fmt: skip
        f = db.feature(feature)
        return render(request, "steer.html", feature=feature, f=f, max_chars=MAX_TEXT_CHARS,
                      max_new_tokens=MAX_NEW_TOKENS, max_strength=MAX_STRENGTH)  # fmt: skip

    return app


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what only: echoing the input back could hold NaN, which JSON cannot."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in errors]  # fmt: skip
    return JSONResponse({"detail": detail}, status_code=422)


def _serve(work: Any) -> Any:
    """Run model work; bad input -> 422, a model or SAE that cannot be loaded -> 503."""
    try:
        return work()
    except InputError as err:
        raise HTTPException(422, str(err)) from None
    except (OSError, RuntimeError, ImportError) as err:
        raise HTTPException(
            503, f"the model or SAE of this index could not be used: {err}"
        ) from None
