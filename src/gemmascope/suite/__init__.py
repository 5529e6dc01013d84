"""A whole Gemma Scope-style suite with one command: plan, cache, train, evaluate, publish, report.

`config` declares the run (`SuiteConfig` holds a `CacheConfig`, a `TrainConfig` and an
`EvalConfig`), `plan` sizes it (disk, memory, measured speeds, time), `manifest` owns the folder's
paths and `suite.json`, `stages` runs and resumes the stages, `status` shows them.
"""

from gemmascope.suite.config import SuiteConfig
from gemmascope.suite.manifest import plan_of, read_manifest, results_file, stage_names
from gemmascope.suite.stages import build_suite
from gemmascope.suite.status import status_table, suite_status

__all__ = [
    "SuiteConfig",
    "build_suite",
    "plan_of",
    "read_manifest",
    "results_file",
    "stage_names",
    "status_table",
    "suite_status",
]
