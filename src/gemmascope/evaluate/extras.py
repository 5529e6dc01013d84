"""The evaluations beyond the core metrics (`EvalConfig.evals`): each one's settings are checked
before the first forward, then each runs after the core passes, on the same SAEs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

Results = list[dict[str, Any] | None]


@contextlib.contextmanager
def extra_evals(
    model: Any, tokenizer: Any, cfg: Any, progress: bool
) -> Iterator[Callable[[Sequence[Any], Sequence[np.ndarray]], Iterator[tuple[str, Results]]]]:
    """Check what `cfg.evals` asks for (a vocabulary that cannot spell, a bad probing task or an
    explainer that does not answer is refused here), then yield `run(items, sequences)`, which yields
    `(name, one result per item)` per evaluation; a local explainer server lives until the block ends."""
    tasks, explainer = [], None
    if "absorption" in cfg.evals:
        from gemmascope.evaluate.spelling import check_spelling

        check_spelling(tokenizer)
    if "sparse_probing" in cfg.evals:
        from gemmascope.evaluate.probing import build_tasks

        tasks = build_tasks(cfg, tokenizer)
    with contextlib.ExitStack() as stack:
        if "autointerp" in cfg.evals:
            from gemmascope.evaluate.explainer import local_weights, open_cache

            if cfg.explainer.url is None:
                local_weights()  # the offline default's weights are there
                open_cache(cfg.explainer.cache)
            else:
                explainer = _explainer(cfg, cfg.explainer.url)  # the endpoint answers

        def run(
            items: Sequence[Any], sequences: Sequence[np.ndarray]
        ) -> Iterator[tuple[str, Results]]:
            if "absorption" in cfg.evals:
                from gemmascope.evaluate.absorption import absorption

                yield "absorption", absorption(model, tokenizer, items, cfg, progress=progress)
            if tasks:
                from gemmascope.evaluate.probing import sparse_probing

                yield "sparse_probing", sparse_probing(model, tokenizer, items, tasks, cfg,
                                                       progress=progress)  # fmt: skip
            if "autointerp" in cfg.evals:
                from gemmascope.evaluate.autointerp import autointerp
                from gemmascope.evaluate.explainer import LOCAL_NAME, local_explainer

                nonlocal explainer
                if explainer is None:  # started after the forwards, so it does not compete
                    url = stack.enter_context(local_explainer())
                    explainer = _explainer(cfg, url, LOCAL_NAME)
                yield "autointerp", autointerp(model, tokenizer, items, sequences, cfg, explainer,
                                               progress=progress)  # fmt: skip

        yield run


def _explainer(cfg: Any, url: str, name: str | None = None) -> Any:
    from gemmascope.evaluate.explainer import Explainer

    return Explainer(cfg.explainer, url, name)
