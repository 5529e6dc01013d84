"""Feature explorer: what every latent of an SAE does over a corpus, browsed in a local web app.

`build_index` runs the SAE over a corpus and writes one SQLite file (schema in `store`); `IndexDB`
reads it; `gemmascope.explore.app.create_app` serves it (imported on its own, so indexing does not
need the web packages).
"""

from gemmascope.explore.index import IndexConfig, build_index
from gemmascope.explore.lens import LogitLens, logit_lens
from gemmascope.explore.store import IndexDB

__all__ = ["IndexConfig", "IndexDB", "LogitLens", "build_index", "logit_lens"]
