"""Sparse probing: probes find a planted feature, tasks split by document, the eval end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer

from gemmascope.evaluate import EvalConfig, evaluate
from gemmascope.evaluate.probing import balanced, build_task, probe_accuracies
from gemmascope.models import model_info
from gemmascope.sae import SAE, SAEConfig


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """30 noise dimensions, three classes; dimension 7 carries whether a sample is of class 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 30, generator=g)
    x[:, 7] += 4.0 * (y == 1)
    return x, y


def test_k_sparse_probe_finds_the_planted_dimension() -> None:
    (tr, tr_y), (te, te_y) = _planted(300, 0), _planted(150, 1)
    acc = probe_accuracies(tr, tr_y, te, te_y, 3, [None, 1])
    assert acc[1][1] > 0.95 and acc[None][1] > 0.95  # class 1: dimension 7 alone tells it
    assert max(acc[1][0], acc[1][2]) < 0.75  # classes 0 and 2 have nothing planted
    shuffled = tr_y[torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(2))]
    assert probe_accuracies(tr, shuffled, te, te_y, 3, [1])[1][1] < 0.8  # the test can fail


def test_balanced_draws_negatives_evenly_from_the_other_classes() -> None:
    x = torch.arange(90.0)[:, None]
    y = torch.arange(90) // 30  # 30 of each of 3 classes
    xs, ys = balanced(x, y, 0, seed=0)
    assert int(ys.sum()) == 30 and len(ys) == 60
    negatives = xs[ys == 0, 0]
    assert int((negatives >= 60).sum()) == 15 and int((negatives < 30).sum()) == 0


def _task_file(tmp_path: Path) -> Path:
    """Documents of class `a` repeat w5, of class `b` w6 (60% of words), among random ones; 40 each."""
    rng = random.Random(0)
    rows = []
    for i in range(80):
        label, word = ("a", "w5") if i % 2 else ("b", "w6")
        words = [word if rng.random() < 0.6 else f"w{rng.randrange(7, 60)}" for _ in range(40)]
        rows.append({"text": " ".join(words), "label": label})
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_tasks_split_by_document_and_window_documents(tmp_path: Path) -> None:
    task = build_task(
        str(_task_file(tmp_path)), tiny_tokenizer(), context=16, n_train=40, n_test=10
    )
    assert task.classes == ["a", "b"] and task.train_ids.shape == (40, 16)
    assert bool((task.train_ids[:, 0] == 2).all())  # BOS first
    assert sorted(task.train_y.tolist()) == [0] * 20 + [1] * 20
    train = {tuple(row.tolist()) for row in task.train_ids}
    assert not train & {tuple(row.tolist()) for row in task.test_ids}
    with pytest.raises(ValueError, match="no `label` column"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "w3 w4"}))
        build_task(str(bad), tiny_tokenizer(), context=16, n_train=4, n_test=4)


def test_sparse_probing_in_evaluate(tmp_path: Path) -> None:
    model, tok = build_tiny("gemma3"), tiny_tokenizer()
    d = model_info(model).site_width("resid_post")
    sae = SAE(SAEConfig("relu", d_in=d, d_sae=2 * d, layer=0, site="resid_post"))
    eye = torch.eye(d)
    sae.W_enc.data = torch.cat([eye, -eye], 1)
    sae.W_dec.data = torch.cat([eye, -eye], 0)
    corpus = tmp_path / "doc.txt"
    corpus.write_text(" ".join(f"w{i % 60 + 3}" for i in range(400)))
    cfg = EvalConfig(corpus=str(corpus), split="all", tokens=64, context_size=16,
                     evals=["core", "sparse_probing"], probe_tasks=[str(_task_file(tmp_path))],
                     probe_train=40, probe_test=16, probe_context=16, probe_k=[1, 2])  # fmt: skip
    (r,) = evaluate(model, tok, [sae], cfg, progress=False)
    found = r["saebench"]["sparse_probing"]
    assert sorted(found["llm"]) == ["llm_test_accuracy", "llm_top_1_test_accuracy",
                                    "llm_top_2_test_accuracy"]  # fmt: skip
    assert found["llm"]["llm_test_accuracy"] == 1.0  # w5 against w6: the embeddings differ
    assert found["sae"]["sae_test_accuracy"] == 1.0  # a lossless SAE keeps what tells them apart
    assert found["details"][0]["dataset_name"].endswith("task.jsonl")
    with pytest.raises(ValueError, match="keep it"):
        EvalConfig(evals=["sparse_probing"])


def test_a_bad_task_is_refused_before_any_forward(tmp_path: Path, no_forward: None) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"w{i} w4", "label": "x"}) for i in range(5, 30)))
    corpus = tmp_path / "doc.txt"
    corpus.write_text(" ".join(f"w{i % 60 + 3}" for i in range(400)))
    cfg = EvalConfig(corpus=str(corpus), split="all", tokens=32, context_size=16,
                     evals=["core", "sparse_probing"], probe_tasks=[str(one)])  # fmt: skip
    with pytest.raises(ValueError, match="1 label"):
        evaluate(build_tiny("llama"), tiny_tokenizer(), [], cfg, progress=False)
