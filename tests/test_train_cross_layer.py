"""Cross-layer transcoders: the sparse step against autograd, learning a known cross-layer map,
the export's folding, resume, and the spec's rules."""

import pytest
import torch

from gemmascope import io
from gemmascope.clt import CLT
from gemmascope.train import SAESpec, TrainConfig, tensor_batches, train
from gemmascope.train.cross_layer import CLTParams, clt_forward_backward, dense_clt_forward_backward
from gemmascope.train.objectives import Objective

FAST = dict(batch_size=512, lr=3e-3, log_every=5, checkpoint_every=10**9)


@pytest.mark.parametrize("density", [0.02, 1.0], ids=["dense-path", "sparse-path"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk", "batchtopk"])
def test_sparse_step_equals_autograd(arch, skip, density):
    L, d, m, B = 3, 8, 32, 64
    p = CLTParams(L, d, m, 0.05, torch.Generator().manual_seed(0), 0.5, skip)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init, so every block of every parameter has a gradient
        for q in p.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=g))
    xs = [torch.randn(B, d, generator=g) for _ in range(L)]
    ys = [torch.randn(B, d, generator=g) for _ in range(L)]
    obj = Objective(arch, coefficient=0.3, target_l0=5 if arch == "jumprelu" else None, k=4,
                    bandwidth=0.5, frequency_coefficient=0.2 if arch == "jumprelu" else 0.0,
                    max_frequency=0.05, max_density=density)  # fmt: skip
    sparse = clt_forward_backward(p, xs, ys, obj)
    grads = {n: q.grad.clone() for n, q in p.named_parameters()}
    dense = dense_clt_forward_backward(p, xs, ys, obj)
    assert sparse.loss == pytest.approx(dense.loss, rel=1e-5)
    assert sparse.l0 == pytest.approx(dense.l0)
    torch.testing.assert_close(sparse.fired, dense.fired)
    for n, q in p.named_parameters():
        torch.testing.assert_close(grads[n], q.grad, rtol=1e-4, atol=1e-5, msg=n)
        if n.startswith(("W_dec", "W_enc")):
            assert float(q.grad.abs().max()) > 0, n


def cross_layer_data(n=20_000, L=3, d=16, features=32, active=2, seed=0):
    """Inputs that are sparse codes per layer, and targets every earlier layer's codes write to:
    a per-layer transcoder cannot predict layer 2's target from layer 2's input alone."""
    g = torch.Generator().manual_seed(seed)
    codes = [(torch.rand(n, features, generator=g) < active / features)
             * (0.5 + torch.rand(n, features, generator=g)) for _ in range(L)]  # fmt: skip
    enc = [
        torch.nn.functional.normalize(torch.randn(features, d, generator=g), dim=1)
        for _ in range(L)
    ]
    xs = [5.0 * c @ e + 0.3 for c, e in zip(codes, enc, strict=True)]  # shifted and scaled sites
    ys = [sum(2.0 * codes[i] @ torch.randn(features, d, generator=g) for i in range(j + 1)) - 1.0
          for j in range(L)]  # fmt: skip
    return {**{(i, "mlp_in"): x for i, x in enumerate(xs)},
            **{(i, "mlp_out"): y for i, y in enumerate(ys)}}  # fmt: skip


def fvu_per_layer(clt: CLT, data: dict, rows: slice) -> list[float]:
    L = clt.n_layers
    x = torch.stack([data[(i, "mlp_in")][rows] for i in range(L)], 1)  # (n, L, d)
    y = torch.stack([data[(i, "mlp_out")][rows] for i in range(L)], 1)
    with torch.no_grad():
        err = (clt(x) - y).pow(2).sum((0, 2))
    return (err / (y - y.mean(0)).pow(2).sum((0, 2))).tolist()


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_learns_a_known_cross_layer_map(tmp_path, arch):
    data = cross_layer_data()
    train_part = {k: v[:16_000] for k, v in data.items()}
    sparsity = {"target_l0": 4.0} if arch == "jumprelu" else {"k": 4}
    spec = SAESpec(0, "mlp_in", 64, arch, target_site="mlp_out", n_layers=3, **sparsity)
    alone = SAESpec(2, "mlp_in", 64, arch, target_site="mlp_out", **sparsity)  # layer 2 alone
    cfg = TrainConfig(tokens=300_000, standardize=True, **FAST)
    out = train([spec, alone], tensor_batches(train_part, 512), cfg, tmp_path, progress=False)
    clt = out[spec.name]
    assert isinstance(clt, CLT) and spec.name == f"clt_0-2_mlp_in_to_mlp_out_w64_{arch}_" + (
        "l0_4" if arch == "jumprelu" else "k4"
    )
    held_out = fvu_per_layer(clt, data, slice(16_000, None))
    x2, y2 = data[(2, "mlp_in")][16_000:], data[(2, "mlp_out")][16_000:]
    with torch.no_grad():
        fvu_alone = float((out[alone.name](x2) - y2).pow(2).sum() / (y2 - y2.mean(0)).pow(2).sum())
    # Layer 2's target is two thirds earlier layers' codes, which its own input does not hold.
    assert max(held_out) < 0.4 and fvu_alone > 0.6, (held_out, fvu_alone)
    with torch.no_grad():  # layer 0's latents learned to write layer 2
        assert float(clt.W_dec[0][:, 2].norm()) > 0.5 * float(clt.W_dec[0][:, 0].norm())
        z = clt.encode(torch.stack([data[(i, "mlp_in")][16_000:] for i in range(3)], 1))
    assert float((z != 0).sum(-1).float().mean()) < 6
    again = io.load(tmp_path / spec.name)
    assert isinstance(again, CLT)
    for name, value in clt.state_arrays().items():
        torch.testing.assert_close(again.state_arrays()[name], value, msg=name)


def test_skip_clt_carries_each_layers_linear_part(tmp_path):
    data = cross_layer_data(n=12_000, L=2)
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        data[(i, "mlp_out")] = data[(i, "mlp_out")] + data[(i, "mlp_in")] @ torch.randn(
            16, 16, generator=g
        )
    spec = SAESpec(0, "mlp_in", 64, "topk", k=3, target_site="mlp_out", n_layers=2,
                   skip_connection=True)  # fmt: skip
    cfg = TrainConfig(tokens=200_000, standardize=True, **FAST)
    clt = train([spec], tensor_batches(data, 512), cfg, tmp_path, progress=False)[spec.name]
    assert max(fvu_per_layer(clt, data, slice(None))) < 0.2
    assert clt.W_skip is not None and float(clt.W_skip.detach().abs().max()) > 0.1


def test_resume_equals_uninterrupted(tmp_path):
    data = cross_layer_data(n=4096, L=2)
    spec = SAESpec(0, "mlp_in", 32, "jumprelu", target_l0=3, target_site="mlp_out", n_layers=2)
    cfg = TrainConfig(tokens=512 * 20, standardize=True, **{**FAST, "checkpoint_every": 8})
    full = train([spec], tensor_batches(data, 512), cfg, tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def dying(start):
        for i, b in enumerate(tensor_batches(data, 512)(start)):
            if start == 0 and i == 12:
                raise Killed
            yield b

    with pytest.raises(Killed):
        train([spec], dying, cfg, tmp_path / "cut", progress=False)
    resumed = train([spec], dying, cfg, tmp_path / "cut", resume=True, progress=False)
    for key, value in full[spec.name].state_arrays().items():
        torch.testing.assert_close(resumed[spec.name].state_arrays()[key], value, msg=key)


def test_spec_rules():
    with pytest.raises(ValueError, match="needs `target_site`"):
        SAESpec(0, "mlp_in", 64, "topk", k=4, n_layers=3)
    with pytest.raises(ValueError, match="no Matryoshka"):
        SAESpec(0, "mlp_in", 64, "topk", k=4, n_layers=3, target_site="mlp_out", matryoshka=[16])
    spec = SAESpec(2, "mlp_in", 64, "jumprelu", l0_size="small", target_site="mlp_out", n_layers=3)
    assert spec.keys == [(2, "mlp_in"), (3, "mlp_in"), (4, "mlp_in"),
                         (2, "mlp_out"), (3, "mlp_out"), (4, "mlp_out")]  # fmt: skip
    assert spec.resolve(18).target_l0 == 16  # small at its last layer, 4 of 18


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_a_one_layer_clt_is_a_transcoder(arch):
    """With one layer, the CLT's parameters, step and Adam update are a skip transcoder's."""
    from gemmascope.train.objectives import Params
    from gemmascope.train.state import Run, adam_update
    from gemmascope.train.step import forward_backward

    d, m, B = 8, 32, 256
    one = Params(d, m, 0.05, torch.Generator().manual_seed(0), 0.5, skip=True)
    clt = CLTParams(1, d, m, 0.05, torch.Generator().manual_seed(0), 0.5, skip=True)
    g = torch.Generator().manual_seed(1)
    cfg = TrainConfig(tokens=B, batch_size=B)
    spec = SAESpec(0, "mlp_in", m, arch, target_l0=4 if arch == "jumprelu" else None,
                   k=4 if arch == "topk" else None, target_site="mlp_out", skip_connection=True)  # fmt: skip
    obj = Objective(arch, coefficient=0.3, target_l0=spec.target_l0, k=spec.k, bandwidth=0.5)
    runs = [Run(spec, p, obj, {n: torch.zeros_like(q) for n, q in p.named_parameters()},
                torch.zeros(m, dtype=torch.int64)) for p in (one, clt)]  # fmt: skip
    for step in range(5):
        x, y = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
        a = forward_backward(one, x, y, obj)
        b = clt_forward_backward(clt, [x], [y], obj)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.l0 == b.l0
        for run in runs:
            adam_update(run, 1e-2, cfg, step)
    for name in ("W_enc", "W_dec", "b_enc", "threshold", "W_skip"):
        torch.testing.assert_close(getattr(clt, name)[0], getattr(one, name), msg=name)
    torch.testing.assert_close(clt.b_dec[0], one.b_dec)
