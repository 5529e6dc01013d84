"""The training state without extra copies: checkpoints of transposed tensors, old checkpoints,
`adam_last`, the in-place export and `SAE.from_arrays(adopt=True)`."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemmascope.common.distributed import Partition
from gemmascope.sae import SAE, SAEConfig
from gemmascope.train import SAESpec, TrainConfig
from gemmascope.train import checkpoint as checkpoint_mod
from gemmascope.train.checkpoint import load_checkpoint, save_checkpoint
from gemmascope.train.state import (
    Norm,
    export,
    full_state,
    new_run,
    place,
    unplace,
)

ALONE = Partition()
SITE, TARGET = (0, "mlp_in"), (0, "mlp_out")
D = 12
CFG = TrainConfig(tokens=64 * 10, batch_size=64)


def _norms(gen: torch.Generator) -> dict:
    return {
        SITE: Norm(torch.randn(D, generator=gen), 2.5, torch.rand(D, generator=gen) + 0.5),
        TARGET: Norm(torch.randn(D, generator=gen), 0.7),
    }


def _trained(spec: SAESpec, seed: int = 0, moments: bool = False):
    """A placed run whose every tensor holds something other than its initial value."""
    gen = torch.Generator().manual_seed(seed)
    run = new_run(spec, D, CFG, 0)
    place(run, ALONE, torch.device("cpu"))
    with torch.no_grad():
        for n, q in run.params.named_parameters():
            q.add_(torch.randn(q.shape, generator=gen))
            run.adam_v[n].copy_(torch.rand(q.shape, generator=gen))
            if moments:  # as `adam_update` makes it: `zeros_like(q)`, in q's layout
                m = torch.randn(q.shape, generator=gen)
                run.adam_v[f"{n}.m"] = torch.empty_like(q.detach()).copy_(m)
    run.last_fired.copy_(torch.randint(0, 1000, run.last_fired.shape, generator=gen))
    if run.adam_last is not None:
        run.adam_last.copy_(torch.randint(0, 7, run.adam_last.shape, generator=gen))
    run.batchtopk_threshold = 0.25
    return run, _norms(gen)


def _assert_same_run(got, want) -> None:
    for (n, q), (_, p) in zip(
        got.params.named_parameters(), want.params.named_parameters(), strict=True
    ):
        assert torch.equal(q, p), n
        assert q.stride() == p.stride(), n  # W_enc keeps its one-latent-per-row layout
    assert sorted(got.adam_v) == sorted(want.adam_v)
    for n, v in want.adam_v.items():
        assert torch.equal(got.adam_v[n], v), n
        assert got.adam_v[n].stride() == v.stride(), n
    assert torch.equal(got.last_fired, want.last_fired)
    assert got.batchtopk_threshold == want.batchtopk_threshold


SAE_SPEC = SAESpec(0, "mlp_in", 40, "jumprelu", target_l0=4, target_site="mlp_out",
                   skip_connection=True)  # fmt: skip


@pytest.mark.parametrize("moments", [False, True], ids=["beta1=0", "beta1>0"])
def test_checkpoint_round_trip_saves_w_enc_as_its_transpose(tmp_path, monkeypatch, moments):
    monkeypatch.setattr(checkpoint_mod._Stored, "BLOCK", 100)  # read in many blocks
    run, norms = _trained(SAE_SPEC, moments=moments)
    full = full_state(run, ALONE)  # the run's own tensors: nothing copied
    assert full["params.W_enc"].data_ptr() == run.params.W_enc.data_ptr()
    assert full["adam.W_enc"].data_ptr() == run.adam_v["W_enc"].data_ptr()
    save_checkpoint(tmp_path / "ckpt", [run], norms, 7)
    with safe_open(tmp_path / "ckpt" / "state.safetensors", "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_slice("0.params.W_enc.T").get_shape()) == (40, D)
        assert torch.equal(f.get_tensor("0.params.W_enc.T"), run.params.W_enc.detach().T)
    assert {"0.params.W_enc.T", "0.adam.W_enc.T", "0.adam_last"} <= keys
    assert "0.params.W_enc" not in keys and "0.adam.W_enc" not in keys
    assert ("0.adam.W_enc.m.T" in keys) == moments

    step, loaded_norms, (back,) = load_checkpoint(tmp_path / "ckpt", [SAE_SPEC], CFG)
    assert step == 7
    _assert_same_run(back, run)
    assert torch.equal(back.adam_last, run.adam_last)  # adam_last survives the checkpoint
    for k, n in norms.items():
        assert torch.equal(loaded_norms[k].mean, n.mean) and loaded_norms[k].scale == n.scale
        assert (n.dims is None) == (loaded_norms[k].dims is None)
        assert n.dims is None or torch.equal(loaded_norms[k].dims, n.dims)


def _save_the_old_way(ckpt, runs, norms, step) -> None:
    """`save_checkpoint` as it was before transposed keys and `adam_last`."""
    tensors, extra = {}, {}
    for i, run in enumerate(runs):
        state = {f"params.{n}": q.detach() for n, q in run.params.named_parameters()}
        state.update({f"adam.{n}": v for n, v in run.adam_v.items()})
        state["last_fired"] = run.last_fired
        tensors.update({f"{i}.{k}": t.cpu().contiguous() for k, t in state.items()})
        extra[run.spec.name] = {"index": i, "batchtopk_threshold": run.batchtopk_threshold}
    tensors.update({f"mean.{k[0]}.{k[1]}": n.mean.contiguous() for k, n in norms.items()})
    tensors.update({f"dims.{k[0]}.{k[1]}": n.dims for k, n in norms.items() if n.dims is not None})
    ckpt.mkdir()
    save_file(tensors, ckpt / "state.safetensors")
    scales = [[k[0], k[1], n.scale] for k, n in norms.items()]
    (ckpt / "state.json").write_text(json.dumps({"step": step, "scales": scales, "runs": extra}))


def test_a_checkpoint_saved_the_old_way_loads_up_to_date(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_mod._Stored, "BLOCK", 100)
    clt_spec = SAESpec(0, "mlp_in", 16, "topk", k=2, target_site="mlp_out", n_layers=2)
    run, norms = _trained(SAE_SPEC, moments=True)
    clt, _ = _trained(clt_spec, seed=1)
    more = _norms(torch.Generator().manual_seed(2))
    clt_norms = {(1, "mlp_in"): more[SITE], (1, "mlp_out"): more[TARGET]}
    _save_the_old_way(tmp_path / "old", [run, clt], {**norms, **clt_norms}, 30)
    step, _, (back, back_clt) = load_checkpoint(tmp_path / "old", [SAE_SPEC, clt_spec], CFG)
    assert step == 30
    _assert_same_run(back, run)
    _assert_same_run(back_clt, clt)
    # the dense optimizer decayed every row at every step
    assert back.adam_last is not None and (back.adam_last == 30).all()
    assert back_clt.adam_last is None


def test_adam_last_is_placed_gathered_and_checkpointed_like_last_fired(tmp_path):
    run = new_run(SAE_SPEC, D, CFG, 0)
    assert run.adam_last is not None and run.adam_last.dtype == torch.int64
    assert run.adam_last.shape == (40,) and not run.adam_last.any()
    run.adam_last[3] = 5
    place(run, Partition(latents=True), torch.device("cpu"))  # one rank: every latent
    assert full_state(run, ALONE)["adam_last"][3] == 5
    save_checkpoint(tmp_path / "ckpt", [run], _norms(torch.Generator()), 9)
    _, _, (back,) = load_checkpoint(tmp_path / "ckpt", [SAE_SPEC], CFG)
    assert back.adam_last is not None and torch.equal(back.adam_last, run.adam_last)
    unplace(back, ALONE)
    assert back.adam_last is not None and back.adam_last[3] == 5
    clt_spec = SAESpec(0, "mlp_in", 16, "topk", k=2, target_site="mlp_out", n_layers=2)
    assert new_run(clt_spec, D, CFG, 0).adam_last is None


def _old_export(run, norms, cfg) -> SAE:
    """`export` as it was: new arrays, copied into a new SAE."""
    from gemmascope.train.state import _exported_config

    spec, p = run.spec, run.params
    (mu_in, c_in), (mu_out, c_out) = (
        (norms[k].mean, norms[k].divisor()) for k in (spec.source, spec.target)
    )
    with torch.no_grad():
        threshold = p.threshold.clone()
        if spec.architecture == "batchtopk":
            threshold = torch.full_like(threshold, run.batchtopk_threshold)
        arrays = {
            "W_enc": p.W_enc / c_in[:, None],
            "W_dec": p.W_dec * c_out,
            "b_enc": p.b_enc - (mu_in / c_in) @ p.W_enc,
            "b_dec": p.b_dec * c_out + mu_out,
            "threshold": threshold,
        }
        if p.W_skip is not None:
            arrays["W_skip"] = p.W_skip / c_in[:, None] * c_out
            arrays["b_dec"] = arrays["b_dec"] - ((mu_in / c_in) @ p.W_skip) * c_out
    cfg_ = _exported_config(run, norms, cfg, p.W_enc.shape[0])
    return SAE.from_arrays(cfg_, arrays, source=spec.name).eval()


@pytest.mark.parametrize(
    "spec",
    [
        SAE_SPEC,
        SAESpec(0, "mlp_in", 40, "batchtopk", k=3, target_site="mlp_out"),
        SAESpec(0, "mlp_in", 40, "relu", l0_coefficient=1e-3),
    ],
    ids=["skip-transcoder", "batchtopk", "sae"],
)
def test_export_in_place_equals_the_old_export(spec):
    run, norms = _trained(spec)
    want = _old_export(copy.deepcopy(run), norms, CFG)
    w_enc = run.params.W_enc.data_ptr()
    got = export(run, norms, CFG)
    assert got.W_enc.data_ptr() == w_enc  # the run's own tensor, folded in place
    assert run.adam_v == {} and run.adam_last is None  # the optimizer state went first
    assert got.cfg == want.cfg and not got.training
    for name, t in want.state_arrays().items():
        torch.testing.assert_close(got.state_arrays()[name], t, rtol=1e-6, atol=1e-6, msg=name)
    x = torch.randn(32, D)
    torch.testing.assert_close(got(x), want(x), rtol=1e-5, atol=1e-5)


def _arrays(d=6, m=10):
    g = torch.Generator().manual_seed(0)
    return {
        "W_enc": torch.randn(m, d, generator=g).T,  # the transpose of a row-major array
        "W_dec": torch.randn(m, d, generator=g),
        "b_enc": torch.randn(m, generator=g),
        "b_dec": torch.randn(d, generator=g),
        "threshold": torch.rand(m, generator=g),
    }


def test_from_arrays_adopts_tensors_without_copying_yet_refuses_nan():
    cfg = SAEConfig("jumprelu", d_in=6, d_sae=10)
    arrays = _arrays()
    sae = SAE.from_arrays(cfg, arrays, adopt=True)
    for name, t in arrays.items():
        assert getattr(sae, name).data_ptr() == t.data_ptr(), name
        assert getattr(sae, name).requires_grad
    copied = SAE.from_arrays(cfg, arrays)  # without `adopt`: copies, as before
    for name, t in arrays.items():
        assert getattr(copied, name).data_ptr() != t.data_ptr(), name
        assert torch.equal(getattr(copied, name), t)
    x = torch.randn(4, 6)
    torch.testing.assert_close(sae(x), copied(x))
    # another dtype, or a strided slice of a bigger tensor, is copied even with `adopt`
    other = {**arrays, "b_enc": arrays["b_enc"].double(), "W_dec": torch.randn(10, 12)[:, ::2]}
    mixed = SAE.from_arrays(cfg, other, adopt=True)
    assert (
        mixed.b_enc.dtype == torch.float32 and mixed.b_enc.data_ptr() != other["b_enc"].data_ptr()
    )
    assert (
        torch.equal(mixed.W_dec, other["W_dec"])
        and mixed.W_enc.data_ptr() == arrays["W_enc"].data_ptr()
    )

    broken = _arrays()
    broken["W_enc"][2, 7] = float("nan")
    broken["W_enc"][0, 0] = float("inf")
    broken["W_dec"][9, 5] = float("nan")
    with pytest.raises(ValueError, match=r"'W_enc' holds 2 non-finite"):
        SAE.from_arrays(cfg, broken, adopt=True)
    opened = SAE.from_arrays(cfg, broken, adopt=True, allow_nonfinite=True)
    assert opened.W_dec.data_ptr() == broken["W_dec"].data_ptr()


def test_the_non_finite_count_spans_blocks():
    from gemmascope.sae import _count_nonfinite

    t = torch.zeros(300, 7)
    t[0, 0], t[150, 3], t[299, 6] = float("nan"), float("inf"), float("-inf")
    for layout in (t, t.T.contiguous().T, t.reshape(-1), t[::2]):
        want = int((~torch.isfinite(layout)).sum())
        assert _count_nonfinite(layout, block=16) == want
    assert _count_nonfinite(torch.tensor(float("nan"))) == 1
    assert _count_nonfinite(torch.arange(5)) == 0


def test_a_truncated_checkpoint_is_named_damaged(tmp_path):
    run, norms = _trained(SAE_SPEC)
    save_checkpoint(tmp_path / "ckpt", [run], norms, 3)
    file = tmp_path / "ckpt" / "state.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(tmp_path / "ckpt", [SAE_SPEC], CFG)
    file.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(tmp_path / "ckpt", [SAE_SPEC], CFG)
