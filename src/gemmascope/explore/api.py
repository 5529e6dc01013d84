"""The explorer's JSON API under `/api`: every SAE by its key, every number bounded.

Writes (a user's explanation) are `PUT` with a JSON body, which a page on another site cannot send
without a CORS preflight this server never grants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from gemmascope.evaluate.explanations import MAX_CHARS
from gemmascope.explore.live import InputError, Unavailable
from gemmascope.explore.service import Explorer, NotFound

MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 64
MAX_STRENGTH = 10_000.0
PER_PAGE = 50

Sort = Annotated[Literal["id", "density", "max_act"], Query()]
Order = Annotated[Literal["asc", "desc"], Query()]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
Search = Annotated[str, Query(max_length=100)]
T = TypeVar("T")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FiresRequest(_Body):
    """Body of `POST /api/sae/{key}/fires`."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    top: int = Field(default=5, ge=1, le=20)


class PromptRequest(_Body):
    """Body of `POST /api/prompt`: the text, and which SAEs (see `Explorer.prompt`)."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    sites: list[Annotated[str, Field(max_length=40)]] | None = Field(default=None, max_length=10)
    width: int | None = Field(default=None, ge=1, le=1 << 24)
    l0: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    top: int = Field(default=3, ge=1, le=10)


class SteerRequest(_Body):
    """Body of `POST /api/sae/{key}/steer`."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    feature: int = Field(ge=0)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    max_new_tokens: int = Field(default=24, ge=1, le=MAX_NEW_TOKENS)


class ExplanationRequest(_Body):
    """Body of `PUT /api/sae/{key}/features/{fid}/explanation`; empty text removes it."""

    text: str = Field(max_length=MAX_CHARS)


def served(work: Callable[[], T]) -> T:
    """Run a request's work: unknown SAE or latent -> 404, bad input -> 422, a model or SAE that
    cannot be loaded -> 503; anything else is the explorer's own fault (the guard's JSON 500)."""
    try:
        return work()
    except NotFound as err:
        raise HTTPException(404, str(err)) from None
    except InputError as err:
        raise HTTPException(422, str(err)) from None
    except Unavailable as err:
        raise HTTPException(503, str(err)) from None


def router(ex: Explorer) -> APIRouter:
    """The API routes over the explorer `ex`."""
    api = APIRouter(prefix="/api")

    @api.get("/saes")
    def saes() -> dict[str, Any]:
        return {"saes": [e.summary() | {"label": e.label} for e in ex.catalog]}

    @api.get("/sae/{key}")
    def sae(key: str) -> dict[str, Any]:
        e = served(lambda: ex.entry(key))
        return e.summary() | {"meta": e.meta, "n_features": e.db.n_features}

    @api.get("/sae/{key}/features")
    def features(key: str, sort: Sort = "density", order: Order = "desc", page: PageNo = 1,
                 per_page: Annotated[int, Query(ge=1, le=200)] = PER_PAGE,
                 q: Search = "") -> dict[str, Any]:  # fmt: skip
        e = served(lambda: ex.entry(key))
        q = served(lambda: ex.check_query(e, q))
        total, found = e.db.list_features(sort=sort, descending=order == "desc", page=page,
                                          per_page=per_page, query=q)  # fmt: skip
        return {"total": total, "page": page, "per_page": per_page, "features": found}

    @api.get("/sae/{key}/features/{fid}")
    def feature(key: str, fid: int) -> dict[str, Any]:
        return served(lambda: ex.feature(ex.entry(key), fid))

    @api.get("/sae/{key}/features/{fid}/neighbours")
    def neighbours(key: str, fid: int) -> dict[str, Any]:
        return served(lambda: ex.neighbours(ex.entry(key), fid))

    @api.get("/sae/{key}/features/{fid}/cofiring")
    def cofiring(key: str, fid: int) -> dict[str, Any]:
        return {"latents": served(lambda: ex.cofiring(ex.entry(key), fid))}

    @api.put("/sae/{key}/features/{fid}/explanation")
    def explanation(key: str, fid: int, body: ExplanationRequest) -> dict[str, Any]:
        return {"explanation": served(lambda: ex.set_explanation(ex.entry(key), fid, body.text))}

    @api.post("/sae/{key}/fires")
    def fires(key: str, body: FiresRequest) -> dict[str, Any]:
        e = served(lambda: ex.entry(key))
        result = served(lambda: ex.live.fires(body.text, [e], top=body.top))
        sae = result["saes"][0]
        summary = {x["id"]: x for x in ex.latents(e, [f["id"] for f in sae["features"]])}
        for f in sae["features"]:
            s = summary.get(f["id"], {})
            f.update(density=s.get("density"), index_max_act=s.get("max_act"),
                     lens_top=s.get("lens_top", []), explanation=s.get("explanation"))  # fmt: skip
        tokens = [t | {"latents": cell} for t, cell in zip(result["tokens"], sae["latents"],
                                                            strict=True)]  # fmt: skip
        return {"tokens": tokens, "features": sae["features"]}

    @api.post("/sae/{key}/steer")
    def steer(key: str, body: SteerRequest) -> dict[str, Any]:
        e = served(lambda: ex.entry(key))
        served(lambda: ex.feature(e, body.feature))
        return served(lambda: ex.live.steer(e, body.prompt, body.feature, body.strength,
                                            body.max_new_tokens))  # fmt: skip

    @api.post("/prompt")
    def prompt(body: PromptRequest) -> dict[str, Any]:
        return served(lambda: ex.prompt(body.text, body.sites, body.width, body.l0, body.top))

    @api.get("/search")
    def search(q: Annotated[str, Query(max_length=200)] = "") -> dict[str, Any]:
        return served(lambda: ex.search(q))

    return api
