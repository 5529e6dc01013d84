"""Sparse probing, as SAEBench's `sparse_probing` eval does it, on labelled text that installs offline.

A task is a set of labelled documents. Each sample is a window of `probe_context` tokens of one
document (BOS first, later windows of a long document as further samples); its activation is the
mean over the window's non-special positions, and an SAE's latents are the mean of its per-token
latents over the same positions. Documents, not windows, are split between train and test (by
hash), so no test window shares text with a training one. Per class, one-vs-rest: the positives
are that class's windows, the negatives an equal number drawn evenly from the other classes. The
k-sparse probe keeps the k dimensions with the largest |mean(positive) - mean(negative)| on the
train set and fits a logistic regression (scikit-learn, L2, C=1, 1000 iterations) on them; the
dense probe fits the same on all dimensions. Accuracies are averaged over classes, then tasks.

Tasks: `brown_genre` (the Brown corpus's five largest genres in the default corpus), `source` (which
of the default corpus's five packages a document comes from), or a `.jsonl`/`.parquet` file or a
Hugging Face dataset (`hf:NAME`) with a text column and a `label` column (its five most frequent
labels), for SAEBench's own tasks when online.

Where ours differs from SAEBench 0.6.0: its dense probe on the model's activations is trained with
Adam for up to 100 epochs, ours is the same scikit-learn regression as the sparse ones; its samples
are whole short texts, ours windows of documents.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gemmascope.common.progress import progress_bar
from gemmascope.corpus import special_ids
from gemmascope.hooks import collect
from gemmascope.models import SiteKey

BROWN_GENRES = {"j": "learned", "g": "belles-lettres", "f": "popular lore", "a": "press: reportage",
                "e": "skills and hobbies"}  # fmt: skip
"""The five largest Brown genres (80, 75, 48, 44 and 36 documents), by the letter its files carry."""

CLASSES_PER_TASK = 5
WINDOWS_PER_DOC = 4
TEST_SHARE = 0.2
"""Share of each class's documents held out for the test windows."""


@dataclass
class Task:
    """Token windows `[n, T]` with their class index, split into train and test."""

    name: str
    classes: list[str]
    train_ids: Tensor
    train_y: Tensor
    test_ids: Tensor
    test_y: Tensor


def labelled_documents(task: str, text_column: str = "text") -> list[tuple[str, str]]:
    """(text, label) of every document of a task (see the module docstring for the names)."""
    if task in ("brown_genre", "source"):
        from gemmascope.corpus.default import fetch_default_corpus

        rows = []
        with open(fetch_default_corpus() / "documents.jsonl", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if task == "source":
                    rows.append((doc["text"], doc["source"]))
                elif doc["source"] == "brown" and doc["name"][1:2] in BROWN_GENRES:
                    rows.append((doc["text"], BROWN_GENRES[doc["name"][1]]))
        return rows
    return _read_labelled(task, text_column)


def _read_labelled(task: str, text_column: str) -> list[tuple[str, str]]:
    from gemmascope.corpus import resolve_source

    kind, target = resolve_source(task)
    if kind == "default":
        raise ValueError(
            "the default corpus has no labels; use the tasks `brown_genre` or `source`"
        )
    import datasets

    if kind == "hf":
        table = datasets.load_dataset(target, split="train")
    else:
        fmt = "parquet" if target.endswith(".parquet") else "json"
        table = datasets.load_dataset(fmt, data_files=target, split="train")
    for column in (text_column, "label"):
        if column not in table.column_names:
            raise ValueError(
                f"probing task {task!r} has no `{column}` column (it has {table.column_names}); a "
                "task needs a text column (`--text-column`) and a `label` column"
            )
    return [(str(t), str(y)) for t, y in zip(table[text_column], table["label"], strict=True)]


def build_task(
    name: str, tokenizer: Any, *, context: int, n_train: int, n_test: int, seed: int = 0,
    text_column: str = "text",
) -> Task:  # fmt: skip
    """A task's windows: `n_train` and `n_test` in all, as even over its classes as they allow.

    Documents are taken in the order of a hash of their text, and only as many are tokenized as the
    windows need."""
    rows = labelled_documents(name, text_column)
    counts = Counter(label for _, label in rows)
    classes = sorted(c for c, _ in counts.most_common(CLASSES_PER_TASK))
    if len(classes) < 2:
        raise ValueError(f"probing task {name!r} has {len(classes)} label(s); it needs at least 2")
    docs: dict[tuple[str, bool], list[tuple[bytes, str]]] = {
        (c, t): [] for c in classes for t in (False, True)
    }
    for text, label in rows:
        if label in classes:
            digest = _digest(text)
            docs[label, _held_out(digest)].append((digest, text))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for test, n in ((False, n_train), (True, n_test)):
        ids, ys = [], []
        per_class = max(1, n // len(classes))
        for j, c in enumerate(classes):
            pool = _windows(
                [t for _, t in sorted(docs[c, test])], tokenizer, context, pad, per_class
            )
            if len(pool) < 2:
                raise ValueError(
                    f"probing task {name!r}: class {c!r} has {len(pool)} "
                    f"{'test' if test else 'train'} window(s); it needs more documents"
                )
            ids += pool
            ys += [j] * len(pool)
        out[test] = torch.from_numpy(np.stack(ids)), torch.tensor(ys)
    return Task(name, classes, *out[False], *out[True])


def _windows(texts: list[str], tokenizer: Any, context: int, pad: int, n: int) -> list[np.ndarray]:
    """Up to `n` BOS-led windows of `context` tokens, `WINDOWS_PER_DOC` at most per document
    (padded when a document is shorter), documents in the order given."""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), 32):
        encoded = tokenizer(texts[i : i + 32], add_special_tokens=False,
                            split_special_tokens=True)["input_ids"]  # fmt: skip
        for ids in encoded:
            for w in range(WINDOWS_PER_DOC):
                body = ids[w * (context - 1) : (w + 1) * (context - 1)]
                if not body:
                    break
                seq = np.full(context, pad, dtype=np.int64)
                seq[0] = tokenizer.bos_token_id
                seq[1 : 1 + len(body)] = body
                out.append(seq)
                if len(out) == n:
                    return out
    return out


def _digest(text: str) -> bytes:
    return hashlib.sha256(b"gemmascope-probe\0" + text.encode("utf-8")).digest()


def _held_out(digest: bytes) -> bool:
    return int.from_bytes(digest[:8], "big") / 2.0**64 < TEST_SHARE


# ---------------------------------------------------------------- features and probes
def mean_features(
    model: Any,
    tokenizer: Any,
    saes: Sequence[Any],
    ids: Tensor,
    *,
    batch_size: int,
    bar: Any,
) -> tuple[dict[SiteKey, Tensor], list[Tensor]]:
    """Window means: `{(layer, site): [n, d]}` of the activations each SAE reads, and `[n, F]` of
    each SAE's latents, over non-special positions (one forward per batch serves every SAE)."""
    keys = sorted({(s.cfg.layer, s.cfg.site) for s in saes})
    skip = torch.tensor(special_ids(tokenizer))
    device = next(model.parameters()).device
    dense: dict[SiteKey, list[Tensor]] = {k: [] for k in keys}
    latents: list[list[Tensor]] = [[] for _ in saes]
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size].to(device)  # (B, T)
        keep = ~torch.isin(batch, skip.to(device))  # (B, T)
        attn = (
            (batch != tokenizer.pad_token_id).long() if tokenizer.pad_token_id is not None else None
        )
        acts = collect(model, batch, keys, attention_mask=attn)
        count = keep.sum(1, keepdim=True).clamp_min(1).float()  # (B, 1)
        for k in keys:
            dense[k].append(((acts[k] * keep[..., None]).sum(1) / count).float().cpu())  # (B, d)
        for j, sae in enumerate(saes):
            x = acts[sae.cfg.layer, sae.cfg.site]  # (B, T, d)
            z = sae.encode(x)  # (B, T, F)
            latents[j].append(((z * keep[..., None]).sum(1) / count).float().cpu())  # (B, F)
        bar.update(len(batch))
    return {k: torch.cat(v) for k, v in dense.items()}, [torch.cat(v) for v in latents]


def probe_accuracies(
    train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, n_classes: int,
    ks: Sequence[int | None], seed: int = 0,
) -> dict[int | None, list[float]]:  # fmt: skip
    """Test accuracy of each class's one-vs-rest probe on `k` dimensions (None: all), per k."""
    from sklearn.linear_model import LogisticRegression

    out: dict[int | None, list[float]] = {k: [] for k in ks}
    for c in range(n_classes):
        tr_x, tr_y = balanced(train, train_y, c, seed)
        te_x, te_y = balanced(test, test_y, c, seed + 1)
        diff = (tr_x[tr_y == 1].mean(0) - tr_x[tr_y == 0].mean(0)).abs()  # (D,)
        for k in ks:
            cols = torch.argsort(diff, descending=True)[:k] if k else slice(None)
            probe = LogisticRegression(C=1.0, max_iter=1000)
            probe.fit(tr_x[:, cols].numpy(), tr_y.numpy())
            out[k].append(float(probe.score(te_x[:, cols].numpy(), te_y.numpy())))
    return out


def balanced(x: Tensor, y: Tensor, c: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class `c` against as many samples drawn evenly from the other classes (SAEBench's)."""
    g = torch.Generator().manual_seed(seed * 1000 + c)
    pos = x[y == c]
    others = [x[y == o] for o in sorted(set(y.tolist())) if o != c]
    each = math.ceil(len(pos) / len(others))
    neg = torch.cat([o[torch.randperm(len(o), generator=g)[:each]] for o in others])
    neg = neg[torch.randperm(len(neg), generator=g)[: len(pos)]]
    xs = torch.cat([pos, neg]).double()
    ys = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    return xs, ys


def build_tasks(cfg: Any, tokenizer: Any) -> list[Task]:
    """The tasks an `EvalConfig` names, built (and checked) before any forward."""
    return [
        build_task(t, tokenizer, context=cfg.probe_context, n_train=cfg.probe_train,
                   n_test=cfg.probe_test, text_column=cfg.text_column)
        for t in cfg.probe_tasks
    ]  # fmt: skip


def sparse_probing(
    model: Any, tokenizer: Any, items: Sequence[Any], tasks: Sequence[Task], cfg: Any, *,
    progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """SAEBench's `sparse_probing` metrics for each item (an SAE, or a layer of a CLT as
    `passes.per_layer` gives them) on `tasks` (`build_tasks`), with `cfg` an `EvalConfig`.

    Returns per item `{"llm": {...}, "sae": {...}, "details": [per task]}` with SAEBench's names:
    `llm_test_accuracy`, `llm_top_{k}_test_accuracy`, `sae_test_accuracy`,
    `sae_top_{k}_test_accuracy` (k in `cfg.probe_k`)."""
    total = sum(len(t.train_ids) + len(t.test_ids) for t in tasks)
    ks: list[int | None] = [None, *cfg.probe_k]
    details: list[list[dict[str, Any]]] = [[] for _ in items]
    bar = progress_bar(total, unit="window", desc="sparse probing", enabled=progress)
    with torch.no_grad(), bar:
        for task in tasks:
            dense_tr, sae_tr = mean_features(model, tokenizer, items, task.train_ids,
                                             batch_size=cfg.batch_size, bar=bar)  # fmt: skip
            dense_te, sae_te = mean_features(model, tokenizer, items, task.test_ids,
                                             batch_size=cfg.batch_size, bar=bar)  # fmt: skip
            n = len(task.classes)
            llm = {key: probe_accuracies(dense_tr[key], task.train_y, dense_te[key], task.test_y,
                                         n, ks) for key in dense_tr}  # fmt: skip
            for j, sae in enumerate(items):
                acc = probe_accuracies(sae_tr[j], task.train_y, sae_te[j], task.test_y, n, ks)
                row = {"dataset_name": task.name}
                for prefix, found in (("llm", llm[sae.cfg.layer, sae.cfg.site]), ("sae", acc)):
                    for k in ks:
                        name = (
                            f"{prefix}_test_accuracy"
                            if k is None
                            else f"{prefix}_top_{k}_test_accuracy"
                        )
                        row[name] = float(np.mean(found[k]))
                details[j].append(row)
    out = []
    for rows in details:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "dataset_name"}
        out.append({
            "llm": {k: v for k, v in mean.items() if k.startswith("llm")},
            "sae": {k: v for k, v in mean.items() if k.startswith("sae")},
            "details": rows,
        })  # fmt: skip
    return out
