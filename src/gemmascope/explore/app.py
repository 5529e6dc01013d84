"""The explorer: a local web app over every SAE of a suite (or of the index files given), with its
JSON API under `/api` (see `api`).

Pages: `/` the suite's grid (model -> site -> layer -> width -> L0), `/sae/KEY` one SAE (its
evaluation, density histogram and features), `/sae/KEY/features/ID` one latent (contexts, logit lens,
neighbours across widths and layers, co-firing, explanation), `/prompt` the token x layer heat-map,
`/search` search by explanation, logit-lens token and inference, and per SAE "what fires here" and
steering. Pages are rendered on the server by Jinja2 with autoescaping, and their JavaScript
builds the DOM with `textContent`, so corpus text never becomes markup. Every asset is served from
this package; no request ever names a file (SAEs are chosen by key from the catalog made at start).
The outer checks (allowed hosts, body size, security headers) are `guard.Guard`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from gemmascope.explore.api import (
    MAX_NEW_TOKENS,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    PER_PAGE,
    Order,
    PageNo,
    Search,
    Sort,
    router,
    served,
)
from gemmascope.explore.catalog import Catalog
from gemmascope.explore.guard import CSP, DEFAULT_HOSTS, Guard
from gemmascope.explore.live import InputError, Live
from gemmascope.explore.service import Explorer
from gemmascope.explore.views import density_bars, histogram_bars, register_filters

__all__ = ["CSP", "DEFAULT_HOSTS", "MAX_BODY", "MAX_NEW_TOKENS", "create_app"]

HERE = Path(__file__).parent
MAX_BODY = 64 * 1024
"""Largest request body accepted (bytes); larger ones get 413."""


def create_app(
    sources: str | Path | Sequence[str | Path],
    *,
    live: Live | None = None,
    device: str = "cpu",
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> FastAPI:
    """Build the explorer.

    Args:
        sources: a suite folder (`gemmascope suite`), a folder of index files, or index files
            (`gemmascope index`), one or several.
        live: the models and SAEs behind prompts, neighbours and steering; default loaded lazily
            from each index's meta on first use.
        device: where that lazy load puts them.
        hosts: the names a request's Host header may give (port aside; case-insensitive); any other
            gets 400, so a web page cannot reach this server by rebinding its domain to 127.0.0.1.
    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    ex = Explorer(Catalog(sources), live or Live(device))
    # No /docs: Swagger UI would load its assets from a CDN.
    app = FastAPI(title="gemmascope explorer", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, limit=MAX_BODY, hosts=hosts)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router(ex))
    templates = Jinja2Templates(directory=HERE / "templates")
    register_filters(templates.env)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"catalog": ex.catalog, **context},
                                          status_code=status)  # fmt: skip

    def shown(request: Request, name: str, work: Any) -> Response:
        """Render `name` with what `work()` returns, or the error page with the API's status."""
        try:
            return render(request, name, **served(work))
        except HTTPException as err:
            return render(request, "error.html", status=err.status_code, message=err.detail)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        if len(ex.catalog) == 1:
            return RedirectResponse(f"/sae/{next(iter(ex.catalog)).key}", status_code=307)
        return render(request, "home.html", tree=ex.catalog.tree())

    @app.get("/sae/{key}", response_class=HTMLResponse)
    def sae_page(request: Request, key: str, sort: Sort = "density", order: Order = "desc",
                 page: PageNo = 1, q: Search = "") -> Response:  # fmt: skip
        def work() -> dict[str, Any]:
            e = ex.entry(key)
            ex.check_query(e, q)
            total, features = e.db.list_features(sort=sort, descending=order == "desc",
                                                 page=page, per_page=PER_PAGE, query=q)  # fmt: skip
            return {"e": e, "meta": e.meta, "features": features, "total": total, "page": page,
                    "pages": max(1, -(-total // PER_PAGE)), "sort": sort, "order": order, "q": q,
                    "density": density_bars(ex.densities(e)),
                    "siblings": ex.catalog.same_site(e)}  # fmt: skip

        return shown(request, "sae.html", work)

    @app.get("/sae/{key}/features/{fid}", response_class=HTMLResponse)
    def feature_page(request: Request, key: str, fid: int) -> Response:
        def work() -> dict[str, Any]:
            e = ex.entry(key)
            f = ex.feature(e, fid)
            return {
                "e": e,
                "meta": e.meta,
                "f": f,
                "bars": histogram_bars(f["histogram"], f["max_act"]),
            }

        return shown(request, "feature.html", work)

    @app.get("/sae/{key}/fires", response_class=HTMLResponse)
    def fires_page(request: Request, key: str) -> Response:
        return shown(request, "fires.html", lambda: {"e": (e := ex.entry(key)), "meta": e.meta,
                                                    "max_chars": MAX_TEXT_CHARS})  # fmt: skip

    @app.get("/sae/{key}/steer", response_class=HTMLResponse)
    def steer_page(request: Request, key: str,
                   feature: Annotated[int, Query(ge=0)] = 0) -> Response:  # fmt: skip
        def work() -> dict[str, Any]:
            e = ex.entry(key)
            if feature >= e.db.n_features:  # a number out of range in a query: 422, as the API
                raise InputError(f"feature: there is no feature {feature}; this SAE has features "
                                 f"0..{e.db.n_features - 1}")  # fmt: skip
            return {"e": e, "meta": e.meta, "feature": feature, "f": ex.feature(e, feature),
                    "max_chars": MAX_TEXT_CHARS, "max_new_tokens": MAX_NEW_TOKENS,
                    "max_strength": MAX_STRENGTH}  # fmt: skip

        return shown(request, "steer.html", work)

    @app.get("/prompt", response_class=HTMLResponse)
    def prompt_page(request: Request) -> Response:
        entries = list(ex.catalog)
        return render(request, "prompt.html", max_chars=MAX_TEXT_CHARS,
                      sites=sorted({e.site for e in entries}),
                      widths=sorted({e.width for e in entries}),
                      l0s=sorted({round(e.l0) for e in entries if e.l0 is not None}))  # fmt: skip

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request, q: Annotated[str, Query(max_length=200)] = "") -> Response:
        return shown(request, "search.html", lambda: {"r": ex.search(q), "q": q})

    return app


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what only: echoing the input back could hold NaN, which JSON cannot."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in errors]  # fmt: skip
    return JSONResponse({"detail": detail}, status_code=422)
