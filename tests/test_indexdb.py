"""Reading an index: searches by logit-lens token fold case beyond ASCII."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemmascope.evaluate.feature_stats import FeatureStats
from gemmascope.explore.indexdb import IndexDB
from gemmascope.explore.lens import LogitLens
from gemmascope.explore.store import write_index

TEXTS = {0: "▁École", 1: " ÉTÉ", 2: "ok", 3: "Straße"}


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """Latents 0, 1 and 2 whose top logit-lens tokens are tokens 0, 1 and 3."""
    stats = FeatureStats(3, top_k=1, window=0, bands=1, samples=1, bins=2)
    top = torch.tensor([[0], [1], [3]])
    ones = torch.ones(3, 1)
    lens = LogitLens(ones, top, -ones, torch.full((3, 1), 2))
    path = tmp_path / "i.sqlite"
    write_index(path, {"model": "m", "layer": 0, "site": "resid_post", "special_ids": []}, stats,
                lens, lambda ids: [TEXTS[i].encode() for i in ids], 8)  # fmt: skip
    return path


@pytest.mark.parametrize(("q", "ids"), [("école", [0]), ("ÉCOLE", [0]), ("été", [1]),
                                        ("STRASSE", [2]), ("strasse", [2]), ("ok", [])])  # fmt: skip
def test_lens_search_folds_case_beyond_ascii(index: Path, q: str, ids: list[int]) -> None:
    total, found = IndexDB(index).list_features(sort="id", descending=False, query=q)
    assert (total, [f["id"] for f in found]) == (len(ids), ids)
