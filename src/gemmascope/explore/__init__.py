"""Feature explorer: what every latent of a suite's SAEs does over a corpus, browsed in a local web app.

`build_index` runs one SAE over a corpus and writes one SQLite file (schema in `store`);
`build_indexes` does it for many SAEs of one model from one forward (a suite's index stage);
`IndexDB` reads a file; `Catalog` gathers the files of a suite or folder;
`gemmascope.explore.app.create_app` serves them (imported on its own, so indexing does not need the
web packages).
"""

from gemmascope.explore.catalog import Catalog
from gemmascope.explore.index import IndexConfig, build_index, build_indexes
from gemmascope.explore.indexdb import IndexDB
from gemmascope.explore.lens import LogitLens, logit_lens

__all__ = ["Catalog", "IndexConfig", "IndexDB", "LogitLens", "build_index", "build_indexes",
           "logit_lens"]  # fmt: skip
