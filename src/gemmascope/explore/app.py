"""The explorer: a local web app over one feature index, with its JSON API under `/api`.

Pages are rendered on the server by Jinja2 with autoescaping, and the little JavaScript there is
builds the DOM with `textContent`, so token text never becomes markup. Every asset is served from this
package. Request bodies, texts, strengths and generation lengths are bounded; an unknown feature is a
404 naming the valid range. No request ever names a file: the index is fixed when the app is made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from gemmascope.explore.live import InputError, Live
from gemmascope.explore.store import IndexDB
from gemmascope.explore.views import histogram_bars, register_filters

HERE = Path(__file__).parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
"""Second line of defence after escaping: no inline or foreign script can run on these pages."""
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
    """ASGI middleware: 413 for a body over `limit` (declared or streamed); security headers (CSP,
    nosniff) on every response."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over {self.limit} bytes; send less"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _reply(send, 413, too_large)
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a body without Content-Length: the route answers 413
                raise HTTPException(413, too_large)
            return message

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"content-security-policy", CSP.encode()),
                                      (b"x-content-type-options", b"nosniff")]  # fmt: skip
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def create_app(index: str | Path, *, live: Live | None = None, device: str = "cpu") -> FastAPI:
    """Build the explorer for one index file.

    Args:
        index: the `.sqlite` file written by `gemmascope index`.
        live: the model and SAE for "what fires here" and steering; default loaded lazily from the
            index's meta on first use.
        device: where that lazy load puts them.
    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    db = IndexDB(index)
    live = live or Live(db.meta, device=device)
    # No /docs: Swagger UI would load its assets from a CDN.
    app = FastAPI(title="gemmascope explorer", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, limit=MAX_BODY)
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
                                           per_page=per_page, query=q)  # fmt: skip
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
        f = db.feature(feature) if feature < db.n_features else None
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
