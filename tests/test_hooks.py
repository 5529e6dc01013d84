"""Sites read by hooks agree with the model's own forward, for every supported family."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from gemmascope.hooks import collect, decoder_layers, run_from, splice
from gemmascope.models import SITES, model_info


def _all_sites(model: nn.Module) -> list[tuple[int, str]]:
    return [(layer, site) for layer in range(model_info(model).n_layers) for site in SITES]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _final_norm(model: Any) -> nn.Module:
    base = model.base_model
    return base.norm if hasattr(base, "norm") else base.ln_f


def test_site_shapes_match_model_info(tiny: Any, tokens: torch.Tensor) -> None:
    info = model_info(tiny)
    acts = collect(tiny, tokens, _all_sites(tiny))
    for (_, site), value in acts.items():
        assert value.shape == (*tokens.shape, info.site_width(site)), site


def test_resid_matches_hidden_states(tiny: Any, tokens: torch.Tensor) -> None:
    n = model_info(tiny).n_layers
    acts = collect(tiny, tokens, _all_sites(tiny))
    with torch.no_grad():
        hidden = tiny(tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == n + 1
    for layer in range(n):
        assert_close(acts[layer, "resid_pre"], hidden[layer])
    for layer in range(n - 1):
        assert_close(acts[layer, "resid_post"], hidden[layer + 1])
    # transformers puts the final norm's output in the last entry, not the last block's output.
    with torch.no_grad():
        assert_close(_final_norm(tiny)(acts[n - 1, "resid_post"]), hidden[n])


def test_residual_decomposes(tiny: Any, tokens: torch.Tensor) -> None:
    n = model_info(tiny).n_layers
    acts = collect(tiny, tokens, _all_sites(tiny))
    for layer in range(n):
        total = acts[layer, "resid_pre"] + acts[layer, "attn_out"] + acts[layer, "mlp_out"]
        assert_close(total, acts[layer, "resid_post"])
        if layer + 1 < n:
            assert torch.equal(acts[layer + 1, "resid_pre"], acts[layer, "resid_post"])


def test_attn_z_projects_to_attn_out(tiny: Any, tokens: torch.Tensor) -> None:
    info = model_info(tiny)
    acts = collect(tiny, tokens, _all_sites(tiny))
    for layer, block in enumerate(decoder_layers(tiny)):
        z = acts[layer, "attn_z"]
        with torch.no_grad():
            if info.layout == "gemma":
                out = block.post_attention_layernorm(block.self_attn.o_proj(z))
            elif info.layout == "llama":
                out = block.self_attn.o_proj(z)
            else:
                out = block.attn.c_proj(z)
        assert_close(out, acts[layer, "attn_out"])


def test_collect_stops_early(tiny: Any, tokens: torch.Tensor) -> None:
    n = model_info(tiny).n_layers
    full = collect(tiny, tokens, _all_sites(tiny))
    calls: list[str] = []
    blocks = decoder_layers(tiny)
    watched = {"last block": blocks[n - 1], "unembedding": tiny.get_output_embeddings()}
    handles = [m.register_forward_hook(lambda *_, k=k: calls.append(k)) for k, m in watched.items()]
    try:
        early = collect(tiny, tokens, [(1, "attn_z"), (0, "mlp_out"), (1, "resid_pre")])
        assert calls == []  # neither the last block nor the unembedding ran
        last = collect(tiny, tokens, [(n - 1, "resid_post")])
        assert calls == ["last block"]
    finally:
        for h in handles:
            h.remove()
    assert list(early) == [(1, "attn_z"), (0, "mlp_out"), (1, "resid_pre")]
    for pair, value in early.items():
        assert_close(value, full[pair])
    assert_close(last[n - 1, "resid_post"], full[n - 1, "resid_post"])


def test_collect_with_padding_matches_unpadded(tiny: Any, tokens: torch.Tensor) -> None:
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0
    padded = collect(tiny, tokens, [(2, "resid_post")], attention_mask=mask)[2, "resid_post"]
    alone = collect(tiny, tokens[1:, :8], [(2, "resid_post")])[2, "resid_post"]
    assert_close(padded[1, :8], alone[0])


@pytest.mark.parametrize("site", SITES)
def test_splice_identity_and_zero(tiny: Any, tokens: torch.Tensor, site: str) -> None:
    before = _hook_count(tiny)
    with torch.no_grad():
        clean = tiny(tokens).logits
        with splice(tiny, 1, site, lambda x: x):
            same = tiny(tokens).logits
        with splice(tiny, 1, site, torch.zeros_like):
            zeroed = tiny(tokens).logits
            seen = collect(tiny, tokens, [(1, site)])[1, site]
    assert torch.equal(same, clean)
    assert (zeroed - clean).abs().max() > 1e-3
    assert torch.count_nonzero(seen) == 0  # collect inside a splice sees the replaced value
    assert _hook_count(tiny) == before


def test_splice_wrong_shape_is_clear_and_unhooks(tiny: Any, tokens: torch.Tensor) -> None:
    before = _hook_count(tiny)
    with pytest.raises(ValueError, match=r"splice at layer 0 mlp_out: `fn` returned \(2, 12, 5\)"):
        with splice(tiny, 0, "mlp_out", lambda x: x[..., :5]):
            collect(tiny, tokens, [(1, "resid_post")])
    assert _hook_count(tiny) == before


def test_run_from_equals_full_forward(tiny: Any, tokens: torch.Tensor) -> None:
    n = model_info(tiny).n_layers
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0  # right padding, and sequences longer than the Gemma sliding window
    acts = collect(tiny, tokens, _all_sites(tiny), attention_mask=mask)
    with torch.no_grad():
        full = tiny(tokens, attention_mask=mask).logits
    for layer in range(n):
        assert_close(run_from(tiny, layer, acts[layer, "resid_pre"], attention_mask=mask), full)
    assert_close(run_from(tiny, n, acts[n - 1, "resid_post"], attention_mask=mask), full)
    assert all(type(b).__name__ != "_Constant" for b in decoder_layers(tiny))


def test_run_from_applies_later_splices(tiny_gemma3: Any, tokens: torch.Tensor) -> None:
    hidden = collect(tiny_gemma3, tokens, [(1, "resid_pre")])[1, "resid_pre"]
    with splice(tiny_gemma3, 2, "attn_out", torch.zeros_like), torch.no_grad():
        expected = tiny_gemma3(tokens).logits
        got = run_from(tiny_gemma3, 1, hidden)
    assert_close(got, expected)


def test_hooks_removed_after_error(tiny_gemma3: Any, tokens: torch.Tensor) -> None:
    before = _hook_count(tiny_gemma3)

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"), splice(tiny_gemma3, 1, "attn_z", boom):
        collect(tiny_gemma3, tokens, [(0, "resid_pre"), (2, "resid_post")])
    with pytest.raises(KeyError, match="boom"), splice(tiny_gemma3, 0, "resid_pre", boom):
        run_from(tiny_gemma3, 0, torch.zeros(2, 12, 32))
    assert _hook_count(tiny_gemma3) == before
    assert all(type(b).__name__ != "_Constant" for b in decoder_layers(tiny_gemma3))


def test_collect_errors(tiny_gemma3: Any, tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"`sites` is empty"):
        collect(tiny_gemma3, tokens, [])
    with pytest.raises(ValueError, match=r"unknown site 'resid_mid'; choose one of \['resid_pre'"):
        collect(tiny_gemma3, tokens, [(0, "resid_mid")])
    with pytest.raises(ValueError, match=r"layer 3 is out of range; this model has layers 0\.\.2"):
        collect(tiny_gemma3, tokens, [(3, "resid_post")])
    with pytest.raises(ValueError, match=r"layer 7 is out of range"):
        with splice(tiny_gemma3, 7, "attn_out", torch.zeros_like):
            pass


def test_run_from_errors(tiny_gemma3: Any) -> None:
    with pytest.raises(ValueError, match=r"layer 4 is out of range for run_from; use 0\.\.3"):
        run_from(tiny_gemma3, 4, torch.zeros(1, 3, 32))
    with pytest.raises(
        ValueError, match=r"`hidden` has shape \(1, 3, 64\); expected \[batch, seq, 32\]"
    ):
        run_from(tiny_gemma3, 1, torch.zeros(1, 3, 64))


def test_the_splice_docstring_examples_run(tiny_gemma3: Any, tokens: torch.Tensor) -> None:
    """Each `fn = ...` example in `splice`'s docstring is a working splice (one once was not)."""
    import re

    from gemmascope.sae import SAE, SAEConfig

    width = model_info(tiny_gemma3).d_model
    sae = SAE(SAEConfig("jumprelu", d_in=width, d_sae=8, layer=1, site="resid_post"))
    namespace = {"sae": sae, "alpha": 2.0, "direction": torch.ones(width)}
    examples = re.findall(r"`fn = (.+?)`", splice.__doc__ or "")
    assert len(examples) == 2, examples
    for example in examples:
        fn = eval(example, namespace)  # noqa: S307 - our own docstring
        with splice(tiny_gemma3, 1, "resid_post", fn):
            got = collect(tiny_gemma3, tokens, [(1, "resid_post")])[1, "resid_post"]
        assert got.shape[-1] == width


def test_mlp_in_is_what_the_mlp_reads(tiny: Any, tokens: torch.Tensor) -> None:
    info = model_info(tiny)
    acts = collect(tiny, tokens, _all_sites(tiny))
    for layer, block in enumerate(decoder_layers(tiny)):
        mid = acts[layer, "resid_pre"] + acts[layer, "attn_out"]  # the stream the MLP sublayer sees
        with torch.no_grad():
            if info.layout == "gemma":
                normed = block.pre_feedforward_layernorm(mid)
                out = block.post_feedforward_layernorm(block.mlp(normed))
            elif info.layout == "llama":
                normed = block.post_attention_layernorm(mid)
                out = block.mlp(normed)
            else:
                normed = block.ln_2(mid)
                out = block.mlp(normed)
        assert_close(acts[layer, "mlp_in"], normed)
        assert_close(out, acts[layer, "mlp_out"])


def test_splice_from_a_source_replaces_the_mlp(tiny: Any, tokens: torch.Tensor) -> None:
    info = model_info(tiny)
    block = copy.deepcopy(decoder_layers(tiny)[1])  # unhooked: the splice hooks the model's own

    def mlp(x: torch.Tensor) -> torch.Tensor:  # the MLP itself, as a transcoder would stand in
        y = block.mlp(x)
        return block.post_feedforward_layernorm(y) if info.layout == "gemma" else y

    before = _hook_count(tiny)
    with torch.no_grad():
        clean = tiny(tokens).logits
        with splice(tiny, 1, "mlp_out", mlp, source="mlp_in"):
            same = tiny(tokens).logits
        with splice(tiny, 1, "mlp_out", lambda x: 2 * mlp(x), source="mlp_in"):
            doubled = tiny(tokens).logits
    assert_close(same, clean)
    assert (doubled - clean).abs().max() > 1e-3
    assert _hook_count(tiny) == before
    with pytest.raises(ValueError, match="a source must come earlier in the block"):
        with splice(tiny, 1, "mlp_in", mlp, source="mlp_out"):
            pass
    assert _hook_count(tiny) == before
