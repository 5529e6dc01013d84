"""SAEBench's core metrics: ours against sae_bench 0.6.0's own functions on the same model, SAE
and tokens, and our result files against its result classes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny
from toolenv import saebench_module

from gemmascope.evaluate import evaluate_sequences
from gemmascope.evaluate.saebench import max_cosine
from gemmascope.evaluate.saebench_files import core_output
from gemmascope.hooks import collect, splice
from gemmascope.models import model_info
from gemmascope.sae import SAE, SAEConfig

SPECIAL = [0, 1, 2]  # pad, eos, bos of the tiny models
KEY = (1, "resid_post")


def _sequences(n: int = 6, length: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    ids[:, 0] = 2  # BOS
    ids[2, 9] = 1  # an EOS inside, as packing makes them
    return ids


def _sae(model: Any) -> SAE:
    d = model_info(model).site_width(KEY[1])
    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig("jumprelu", d_in=d, d_sae=40, layer=KEY[0], site=KEY[1]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 40, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(40, d, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.threshold.fill_(0.2)
        sae.b_enc[:3] = -100.0  # dead latents
    return sae


def _folded(sae: SAE) -> SAE:
    """The SAE as SAEBench evaluates it: `fold_W_dec_norm` (unit decoder rows, latents scaled)."""
    out = SAE(sae.cfg)
    out.load_state_dict(sae.state_dict())
    with torch.no_grad():
        n = out.W_dec.norm(dim=1)  # (F,)
        out.W_enc.mul_(n)
        out.b_enc.mul_(n)
        out.threshold.mul_(n)
        out.W_dec.div_(n[:, None])
    return out


class _Hooked:
    """What SAEBench's core eval asks of a TransformerLens model, over a transformers one."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, tokens: torch.Tensor, return_type: str = "both", **_: Any) -> Any:
        logits = self.model(input_ids=tokens).logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return logits, loss  # loss (B, T - 1), as loss_per_token=True gives

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list, **kw: Any) -> Any:
        ((_, fn),) = fwd_hooks
        with splice(self.model, *KEY, lambda value: fn(value, hook=None)):
            return self(tokens, **kw)

    def run_with_cache(self, tokens: torch.Tensor, names_filter: list[str], **_: Any) -> Any:
        return None, {names_filter[0]: collect(self.model, tokens, [KEY])[KEY]}


class _Store:
    """SAEBench's activation store, reduced to handing out the same sequences in batches."""

    def __init__(self, ids: torch.Tensor, batch: int) -> None:
        self.ids, self.i = ids, 0
        self.context_size, self.store_batch_size_prompts = ids.shape[1], batch

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.ids[self.i : self.i + n]
        self.i += n
        return out

    def reset_input_dataset(self) -> None:
        self.i = 0


@pytest.fixture(scope="module")
def saebench(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return saebench_module("sae_bench.evals.core.main")


def test_core_metrics_equal_saebench_on_the_same_tokens(saebench: Any) -> None:
    model, ids = build_tiny("gemma3"), _sequences()
    sae = _sae(model)
    (ours,) = evaluate_sequences(model, [sae], ids, skip_ids=SPECIAL, pad_id=0, batch_size=3,
                                 progress=False, details=True)  # fmt: skip
    sae = _folded(sae)  # decoder rows of norm ~5: the fold changes l1 and the encoder's norms
    shim = SimpleNamespace(
        cfg=SimpleNamespace(hook_name="blocks.1.hook_resid_post", hook_head_index=None,
                            hook_layer=KEY[0], d_sae=40, architecture_str="jumprelu"),
        encode=sae.encode, decode=sae.decode, device=sae.device,
        W_enc=sae.W_enc.detach(), W_dec=sae.W_dec.detach(), b_enc=sae.b_enc.detach(),
    )  # fmt: skip
    hooked, store = _Hooked(model), _Store(ids, 3)
    with torch.no_grad():
        down = saebench.get_downstream_reconstruction_metrics(
            shim, hooked, store, compute_kl=True, compute_ce_loss=True, n_batches=2,
            eval_batch_size_prompts=3, ignore_tokens=set(SPECIAL),
            exclude_special_tokens_from_reconstruction=True,
        )  # fmt: skip
        store.reset_input_dataset()
        sparse, features = saebench.get_sparsity_and_variance_metrics(
            shim, hooked, store, n_batches=2, compute_l2_norms=True, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=3, model_kwargs={}, ignore_tokens=set(SPECIAL),
        )  # fmt: skip
        features |= saebench.get_featurewise_weight_based_metrics(shim)
    theirs = {**down, **sparse, **saebench.calculate_misc_metrics(features)}
    flat = {k: v for cat in ours["saebench"]["core"].values() for k, v in cat.items()}
    compared = sorted(set(theirs) & set(flat))
    assert len(compared) == 24, compared  # every SAEBench core metric but the token counts
    for name in compared:
        assert flat[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    assert flat["kl_div_with_sae"] > 1e-3 and flat["ce_loss_score"] != pytest.approx(1)  # lossy
    assert flat["frac_alive"] < 1 and flat["l1"] > 0
    details = ours["saebench_details"]
    for name, values in features.items():
        got, want = torch.tensor(details[name]), torch.tensor(values)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6, equal_nan=True), name


def test_result_files_validate_with_saebench_classes(saebench: Any, tmp_path: Path) -> None:
    from pydantic import TypeAdapter

    CoreEvalOutput = saebench_module("sae_bench.evals.core.eval_output").CoreEvalOutput
    model, ids = build_tiny("gemma3"), _sequences()
    sae = _sae(model)
    (r,) = evaluate_sequences(model, [sae], ids, skip_ids=SPECIAL, batch_size=3, progress=False,
                              details=True)  # fmt: skip
    r.update(source="runs/demo", sae_id="layer_1_resid_post")
    data = json.loads(json.dumps(core_output(r, {"batch_size": 3}, sae.cfg.to_dict())))
    out = TypeAdapter(CoreEvalOutput).validate_python(data)
    assert out.eval_type_id == "core" and len(out.eval_result_details) == 40
    assert out.eval_result_metrics.sparsity.l0 == pytest.approx(r["l0"])
    assert out.eval_result_details[0].consistent_activation_heuristic == -1  # dead: 0/0 -> -1


def test_max_cosine_known_answer_and_sample() -> None:
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # columns at 0, 45 and 90 degrees
    h = 2**-0.5
    assert torch.allclose(max_cosine(w), torch.tensor([h, h, h]))
    big = torch.randn(4, 40_000)
    sample = max_cosine(big)
    assert len(sample) == 1 << 15 and bool((sample > 0.9).all())  # 4-d: near neighbours exist


def test_cli_writes_saebench_files_and_refuses_foreign_ones(
    saebench: Any, tmp_path: Path, tiny_folder: Path
) -> None:
    from pydantic import TypeAdapter
    from typer.testing import CliRunner

    import gemmascope
    from gemmascope.cli import app
    from gemmascope.evaluate import read_results

    CoreEvalOutput = saebench_module("sae_bench.evals.core.eval_output").CoreEvalOutput
    probing = saebench_module("sae_bench.evals.sparse_probing.eval_output")
    SparseProbingEvalOutput = probing.SparseProbingEvalOutput
    model = build_tiny("llama")
    gemmascope.save(_sae(model), tmp_path / "run" / "sae_a")
    corpus = tmp_path / "doc.txt"
    corpus.write_text(" ".join(f"w{i % 60 + 3}" for i in range(400)))
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"text": f"w{5 + i % 2} w{9 + i} w{5 + i % 2}", "label": i % 2})
                              for i in range(40)))  # fmt: skip
    bench = tmp_path / "eval_results"
    args = ["eval", str(tmp_path / "run"), "--model", str(tiny_folder), "--corpus", str(corpus),
            "--split", "all", "--tokens", "64", "--context-size", "16",
            "--evals", "core,sparse_probing", "--probe-tasks", str(task), "--probe-train", "16",
            "--probe-test", "8", "--probe-context", "8",
            "--out", str(tmp_path / "r.json"), "--saebench-out", str(bench)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (path,) = (bench / "core").iterdir()
    assert path.name == "run_sae_a_eval_results.json"
    out = TypeAdapter(CoreEvalOutput).validate_python(json.loads(path.read_text()))
    probing = TypeAdapter(SparseProbingEvalOutput).validate_python(
        json.loads((bench / "sparse_probing" / path.name).read_text())
    )
    assert probing.eval_result_metrics.llm.llm_test_accuracy == 1.0  # w5 against w6
    assert probing.eval_result_metrics.sae.sae_top_5_test_accuracy is not None
    (record,) = read_results(tmp_path / "r.json")
    assert "saebench_details" not in record  # per-latent lists go to the SAEBench file only
    assert out.eval_result_metrics.model_performance_preservation.ce_loss_with_sae == pytest.approx(
        record["saebench"]["core"]["model_performance_preservation"]["ce_loss_with_sae"]
    )
    assert CliRunner().invoke(app, args).exit_code == 0  # our own file: rewritten
    path.write_text(json.dumps({"sae_bench_commit_hash": "abc123"}))  # SAEBench's own run
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "was not written by gemmascope" in str(refused.output)
    assert json.loads(path.read_text()) == {"sae_bench_commit_hash": "abc123"}


def test_result_files_state_the_batches_the_run_read() -> None:
    record = {"model": "m", "source": "runs/a", "sae_id": "x", "layer": 1,
              "saebench": {"core": {"sparsity": {"l0": 1.0}}}}  # fmt: skip
    settings = {"tokens": 10_000, "context_size": 1024, "batch_size": 8}
    config = core_output(record, settings, {})["eval_config"]
    assert config["n_eval_reconstruction_batches"] == 2 and config["batch_size_prompts"] == 8
    assert config["context_size"] == 1024 and config["exclude_special_tokens_from_reconstruction"]


def test_decoder_fold_is_the_row_norm_and_skips_topk() -> None:
    from gemmascope.evaluate.saebench import decoder_fold

    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert decoder_fold(w, "jumprelu").tolist() == [5.0, 2.0]
    assert decoder_fold(w, "topk") is None  # SAELens cannot fold TopK; SAEBench keeps it as is
