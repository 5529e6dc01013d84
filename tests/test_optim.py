"""The fused CPU Adam step equals the same arithmetic written as torch ops."""

import pytest
import torch

from gemmascope.train.optim import adam_step


def _reference(w, g, v, m, lr, beta1, beta2, step, unit_rows):
    """Adam in float64 torch ops: project, moments, step, renormalise."""
    w, g, v = w.double(), g.double(), v.double()
    if unit_rows:
        g = g - (g * w).sum(1, keepdim=True) * w
    v = beta2 * v + (1 - beta2) * g * g
    if beta1 > 0:
        m = beta1 * m.double() + (1 - beta1) * g
        g = m / (1 - beta1 ** (step + 1))
    w = w - lr * g / ((v / (1 - beta2 ** (step + 1))).sqrt() + 1e-8)
    if unit_rows:
        w = w / w.norm(dim=1, keepdim=True)
    return w, v, m


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("shape, unit_rows", [((64, 24), True), ((24, 64), False), ((64,), False)])
def test_fused_step_matches_reference(shape, unit_rows, beta1):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    if unit_rows:
        w0 /= w0.norm(dim=1, keepdim=True)
    q = torch.nn.Parameter(w0.clone())
    v = torch.rand(shape, generator=gen) * 1e-3
    m = torch.randn(shape, generator=gen) * 1e-2
    v0, m0 = v.clone(), m.clone()
    for step in (0, 7):
        g = torch.randn(shape, generator=gen)
        q.grad = g.clone()
        want_w, want_v, want_m = _reference(q.data, g, v, m, 1e-2, beta1, 0.999, step, unit_rows)
        adam_step(q, v, m, lr=1e-2, beta1=beta1, beta2=0.999, step=step, unit_rows=unit_rows)
        torch.testing.assert_close(q.data.double(), want_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=1e-9)
        if beta1 > 0:
            torch.testing.assert_close(m.double(), want_m, rtol=1e-5, atol=1e-7)
        assert q.grad is None
    assert not torch.equal(v, v0) and (beta1 == 0) == torch.equal(m, m0)
    if unit_rows:
        torch.testing.assert_close(q.data.norm(dim=1), torch.ones(shape[0]))


def test_torch_path_matches_fused_path():
    """The non-CPU path (here: float64 takes it) does the same step."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 16, generator=gen)
    w0 /= w0.norm(dim=1, keepdim=True)
    g = torch.randn(32, 16, generator=gen)
    fused = torch.nn.Parameter(w0.clone())
    fused.grad = g.clone()
    v1 = torch.zeros(32, 16)
    adam_step(fused, v1, None, lr=1e-2, beta1=0.0, beta2=0.999, step=3, unit_rows=True)
    other = torch.nn.Parameter(w0.double())  # float64: the torch ops path
    other.grad = g.double()
    v2 = torch.zeros(32, 16, dtype=torch.float64)
    adam_step(other, v2, None, lr=1e-2, beta1=0.0, beta2=0.999, step=3, unit_rows=True)
    torch.testing.assert_close(fused.data.double(), other.data, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1.double(), v2, rtol=1e-5, atol=1e-9)


def test_missing_gradient_is_a_clear_error():
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="no gradient"):
        adam_step(q, torch.zeros(3), None, lr=1e-3, beta1=0.0, beta2=0.999, step=0)
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match="needs the first-moment state"):
        adam_step(q, torch.zeros(3), None, lr=1e-3, beta1=0.9, beta2=0.999, step=0)


def test_training_parameters_take_the_fused_path():
    """After `place` (every training run), each parameter, its gradient and its Adam state share a
    layout, so no step falls back to the torch ops."""
    from gemmascope.train import SAESpec, TrainConfig
    from gemmascope.train.objectives import ALONE
    from gemmascope.train.optim import _row_views
    from gemmascope.train.state import new_run, place
    from gemmascope.train.step import forward_backward

    cfg = TrainConfig(encoder_init_scale=0.1)
    run = new_run(SAESpec(0, "resid_post", 256, "jumprelu", target_l0=8), 32, cfg, 0)
    place(run, ALONE, torch.device("cpu"))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    forward_backward(run.params, x, x, run.objective)
    for name, q in run.params.named_parameters():
        v = run.adam_v[name]
        assert _row_views(q.data, q.grad, v, v, transposed=name != "W_dec") is not None, name


@pytest.mark.parametrize("block", [0, 48])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_row_adam_equals_dense_adam_over_steps(block, beta1):
    """Adam applied block by block to the rows a step touched, each untouched row's second
    moment decayed when it is next touched, ends where dense Adam on whole gradients ends
    (exact for beta1 = 0; with beta1 > 0 every row is stepped)."""
    import copy

    from gemmascope.train import SAESpec, TrainConfig
    from gemmascope.train.objectives import ALONE
    from gemmascope.train.optim import RowAdam, catch_up
    from gemmascope.train.state import adam_update, new_run, place
    from gemmascope.train.step import forward_backward

    cfg = TrainConfig(encoder_init_scale=0.1, beta1=beta1, beta2=0.5)  # decay that shows
    dense = new_run(SAESpec(0, "resid_post", 256, "jumprelu", target_l0=8), 32, cfg, 0)
    place(dense, ALONE, torch.device("cpu"))
    with torch.no_grad():  # most latents silent: each step touches a few dozen rows of 256
        dense.params.threshold.fill_(0.06)
    rows = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(0)
    touched = []
    for step in range(6):
        x = torch.randn(64, 32, generator=gen) * 0.2
        lr = 1e-3
        forward_backward(dense.params, x, x, dense.objective)
        adam_update(dense, lr, cfg, step)
        rows.objective.block = block
        sink = RowAdam(rows.params, rows.adam_v, rows.adam_last, lr=lr,
                       threshold_lr=cfg.threshold_lr, beta1=beta1, beta2=cfg.beta2, step=step)  # fmt: skip
        stats = forward_backward(rows.params, x, x, rows.objective, sink=sink)
        touched.append(int((stats.fired > 0).sum()))
    assert max(touched) < 128  # the sparse rows were exercised
    if beta1 == 0:
        assert int((rows.adam_last < 6).sum()) > 0  # and some rows were left behind
    catch_up(rows.adam_v, rows.adam_last, cfg.beta2, 6)
    for name, q in dense.params.named_parameters():
        torch.testing.assert_close(rows.params.get_parameter(name), q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rows.adam_v[name], dense.adam_v[name], rtol=1e-4, atol=1e-9)
