"""Attribution graphs on known answers: edges sum to their targets (the replacement model is exactly
linear in its sources), exact transcoders leave no error, batched backward passes equal one
target at a time and a finite difference, pruning and the frontend JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from test_evaluate import _mlp_transcoder, _relu_gpt2

from gemmascope.circuits import Graph, attribute
from gemmascope.circuits.replacement import prepare, run
from gemmascope.hooks import collect, run_until_head
from gemmascope.sae import SAE, SAEConfig

IDS = torch.tensor([5, 9, 13, 7, 22, 31, 8, 40])  # no special token: every position has latents


def transcoders(
    d: int = 32, m: int = 64, layers: int = 3, seed: int = 0, b_dec: bool = False
) -> list[SAE]:
    """Random JumpReLU skip transcoders; `b_dec` zero unless asked (it is a constant, no node)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        cfg = SAEConfig("jumprelu", d_in=d, d_sae=m, layer=layer, site="mlp_in",
                        target_site="mlp_out", skip_connection=True)  # fmt: skip
        out.append(SAE.from_arrays(cfg, {
            "W_enc": torch.randn(d, m, generator=g) * 0.5, "W_dec": torch.randn(m, d, generator=g) * 0.3,
            "b_enc": torch.randn(m, generator=g) * 0.1,
            "b_dec": torch.randn(d, generator=g) * 0.1 if b_dec else torch.zeros(d),
            "threshold": torch.rand(m, generator=g) * 0.3, "W_skip": torch.randn(d, d, generator=g) * 0.2,
        }))  # fmt: skip
    return out


def _pre(model: Any, graph: Graph, tcs: list[SAE]) -> torch.Tensor:
    """Each active latent's pre-activation less its bias, from a clean forward."""
    acts = collect(model, graph.ids[None], [(layer, "mlp_in") for layer in range(graph.n_layers)])
    return torch.tensor([float(acts[layer, "mlp_in"][0, p] @ tcs[layer].W_enc[:, f])
                         for layer, p, f in graph.features.tolist()])  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_edges_into_each_target_sum_to_it(family: str) -> None:
    """Without biases, the replacement model is linear and homogeneous in its sources (latents,
    errors, tokens), so a target's incoming edges sum to its value. A pattern or a norm scale left
    unfrozen would break this."""
    model, tcs = build_tiny(family), transcoders()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F = graph.n_features
    assert F > 100 and len(graph.logit_ids) >= 1
    torch.testing.assert_close(
        graph.adjacency[:F].sum(1), _pre(model, graph, tcs), rtol=1e-4, atol=2e-4
    )
    final = run_until_head(model, lambda: model(input_ids=IDS[None]))[0, -1]
    head = model.get_output_embeddings().weight
    want = (head[graph.logit_ids] - head.mean(0)) @ final
    torch.testing.assert_close(graph.adjacency[F:].sum(1), want.detach(), rtol=1e-4, atol=2e-4)
    scores = graph.scores()
    assert 0 < scores["replacement"] < 1 and 0 < scores["completeness"] < 1  # random: errors count


def test_mlps_that_are_their_transcoders_leave_no_error() -> None:
    model = _relu_gpt2()
    tcs = [_mlp_transcoder(model, layer) for layer in range(3)]
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F, LT = graph.n_features, graph.n_layers * graph.n_pos
    assert graph.adjacency[:, F : F + LT].abs().max() == 0
    assert graph.scores() == {"replacement": 1.0, "completeness": 1.0}


def test_an_edge_is_the_finite_difference_with_everything_else_frozen() -> None:
    """Moving one source latent by eps moves a later target's pre-activation by eps * edge / a."""
    model, tcs = build_tiny("gemma3"), transcoders(b_dec=True)
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    layers = graph.features[:, 0]
    s = int(torch.nonzero(layers == 0)[3])  # a source in layer 0
    targets = torch.nonzero(
        (layers == 2) & (graph.features[:, 1] >= graph.features[s, 1])
    ).flatten()
    t = int(targets[graph.adjacency[targets, s].abs().argmax()])  # the target it moves most
    layer, pos, feat = graph.features[s].tolist()
    folded = prepare(tcs, 3)
    eps = 1e-2

    def target_pre(bump: float) -> float:  # the frozen forward, with the source's activation moved
        special = torch.zeros(len(IDS), dtype=torch.bool)
        shift = {(layer, pos): bump * folded[layer].W_dec[feat].detach()}
        rep = run(model, IDS, folded, special, shift=shift)
        tl, tp, tf = graph.features[t].tolist()
        return float(rep.mlp_in[tl][0, tp] @ folded[tl].W_enc[:, tf])

    finite = (target_pre(eps) - target_pre(-eps)) / (2 * eps)
    a = float(graph.activations[s])
    assert finite == pytest.approx(float(graph.adjacency[t, s]) / a, rel=1e-3, abs=1e-5)
    assert abs(finite) > 1e-3  # the check can fail


def test_batched_rows_equal_one_target_at_a_time() -> None:
    model, tcs = build_tiny("llama"), transcoders()
    whole = attribute(model, tiny_tokenizer(), IDS, tcs, batch_size=64, progress=False)
    single = attribute(model, tiny_tokenizer(), IDS, tcs, batch_size=1, progress=False)
    torch.testing.assert_close(whole.adjacency, single.adjacency, rtol=1e-4, atol=1e-5)


def test_pruning_keeps_tokens_and_logits_and_the_json_follows_circuit_tracers_schema(
    tmp_path,
) -> None:
    model, tcs = build_tiny("gemma3"), transcoders()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    pruned = graph.prune(0.8, 0.98)
    N, T, K = graph.node_count(), graph.n_pos, len(graph.logit_ids)
    assert pruned.nodes[N - T - K :].all()
    assert 0 < int(pruned.nodes[: graph.n_features].sum()) < graph.n_features
    assert float(pruned.cumulative.max()) == pytest.approx(1.0)
    data = graph.frontend_json("test", scan="tiny/transcoders")
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert (
        data["metadata"]["prompt_tokens"] == graph.tokens
        and data["metadata"]["schema_version"] == 1
    )
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["node_id"] == f"4_{int(graph.logit_ids[0])}_{T - 1}" and logit["layer"] == "4"
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, pos = (int(v) for v in feature["node_id"].split("_"))
    assert feature["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
    back = Graph.load(graph.save(tmp_path / "g"))
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert back.tokens == graph.tokens and json.dumps(back.frontend_json("t", scan="s"))


def test_interventions_change_what_the_graph_says_they_should() -> None:
    """Setting a latent to its own value changes nothing; zeroing the latent that pushes the top
    logit hardest (a last-layer latent at the last position) lowers that logit's lead."""
    from gemmascope.circuits.intervene import Change, intervene

    model, tcs = build_tiny("gemma3"), transcoders()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F, T = graph.n_features, graph.n_pos
    last = torch.nonzero((graph.features[:, 0] == 2) & (graph.features[:, 1] == T - 1)).flatten()
    s = int(last[graph.adjacency[F, last].argmax()])  # the strongest push on the top logit
    layer, pos, latent = graph.features[s].tolist()
    same = intervene(model, IDS, tcs, [Change(layer, latent, float(graph.activations[s]), pos)])
    assert max(abs(v) for v in same["logit_shift"].values()) < 1e-4
    top = int(graph.logit_ids[0])
    r = intervene(model, IDS, tcs, [Change(layer, latent, 0.0, pos)])
    lead = r["logit_shift"][top] - sum(r["logit_shift"].values()) / len(r["logit_shift"])
    assert float(graph.adjacency[F, s]) > 0 and lead < 0
    with pytest.raises(ValueError, match="no latent 9999 at layer 2"):
        intervene(model, IDS, tcs, [Change(2, 9999)])
    with pytest.raises(ValueError, match=r"expected LAYER:LATENT=VALUE\[@POSITION\]"):
        Change.parse("2:5", ablate=False)
    assert Change.parse("2:5@3", ablate=True) == Change(2, 5, 0.0, 3)


def test_cli_graph_writes_the_graph_and_reruns_with_an_ablation(tmp_path, tiny_folder) -> None:
    from typer.testing import CliRunner

    from gemmascope import io
    from gemmascope.cli import app

    io.save_transcoders(transcoders(), tmp_path / "set")
    args = ["graph", "--model", str(tiny_folder), "--prompt", "w5 w9 w13 w7 w22", "--transcoders",
            str(tmp_path / "set"), "--out", str(tmp_path / "g"), "--ablate", "1:3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "replacement score" in result.output and "latent(s) changed" in result.output
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == [
        "graph-metadata.json",
        "graph.json",
        "graph.safetensors",
        "w5-w9-w13-w7-w22.json",
    ]
    graph = Graph.load(tmp_path / "g")
    assert graph.n_pos == 6 and graph.tokens[0] == "<bos>"
    bad = CliRunner().invoke(app, [*args[:-1], "1:x"])
    assert bad.exit_code == 2 and "expected LAYER:LATENT[@POSITION]" in bad.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    taken = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "other")])
    assert taken.exit_code == 2 and "is not a graph folder" in taken.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
