"""The trainer: the recipe's pieces, learning on data with a known dictionary, sweeps and resume."""

import copy
import json

import pytest
import torch

from gemmascope import io
from gemmascope.train import Run, SAESpec, TrainConfig, expand_sweep, tensor_batches, train
from gemmascope.train.objectives import Objective, Params
from gemmascope.train.state import adam_update
from gemmascope.train.step import forward_backward

SITE = (0, "resid_post")


def sparse_data(n=40_000, d=32, features=256, active=4, seed=0, scale=7.0, offset=0.0):
    """Activations that are sparse sums of unit directions, shifted and scaled like a real site."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    mask = torch.rand(n, features, generator=g) < active / features
    z = mask * (0.5 + torch.rand(n, features, generator=g))
    return scale * (z @ D + offset) + 0.01 * torch.randn(n, d, generator=g)


def fvu(sae, x):
    with torch.no_grad():
        x_hat = sae(x)
    return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def l0(sae, x):
    with torch.no_grad():
        return float((sae.encode(x) != 0).sum(-1).float().mean())


FAST = dict(batch_size=512, lr=3e-3, log_every=5, checkpoint_every=10**9)


@pytest.mark.parametrize(
    "spec",
    [
        SAESpec(0, "resid_post", 256, "jumprelu", target_l0=6),
        SAESpec(0, "resid_post", 256, "topk", k=6),
        SAESpec(0, "resid_post", 256, "batchtopk", k=6),
        SAESpec(0, "resid_post", 256, "relu", l0_coefficient=3e-3),
    ],
    ids=lambda s: s.architecture,
)
def test_learns_a_known_dictionary(tmp_path, spec):
    x = sparse_data()
    cfg = TrainConfig(tokens=200_000, **FAST)
    saes = train([spec], tensor_batches({SITE: x[:30_000]}, 512), cfg, tmp_path, progress=False)
    sae = saes[spec.name]
    held_out = x[30_000:]
    # 12 of 32 principal directions would leave FVU ~0.6; only a learned dictionary gets below 0.5.
    assert fvu(sae, held_out) < 0.5, fvu(sae, held_out)
    if spec.architecture != "relu":
        assert l0(sae, held_out) < 12
    loaded = io.load(tmp_path / spec.name)  # exported raw-scale SAE round-trips through our format
    torch.testing.assert_close(loaded.encode(held_out[:100]), sae.encode(held_out[:100]))
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "fvu", "l0", "dead_fraction", "lr", "coefficient"} <= set(log[-1])


def test_init_is_the_recipe_and_the_encoder_scale_only_scales_w_enc():
    recipe = Params(16, 64, 0.001, torch.Generator().manual_seed(0))
    torch.testing.assert_close(recipe.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(recipe.W_enc, recipe.W_dec.T)
    assert not recipe.b_enc.any() and not recipe.b_dec.any()
    assert (recipe.threshold == 0.001).all()
    short = Params(16, 64, 0.001, torch.Generator().manual_seed(0), encoder_scale=0.1)
    torch.testing.assert_close(short.W_dec, recipe.W_dec)
    torch.testing.assert_close(short.W_enc, 0.1 * recipe.W_dec.T)


def test_decoder_rows_stay_unit_norm_and_gradient_is_projected():
    torch.manual_seed(0)
    p = Params(16, 64, 0.001, torch.Generator().manual_seed(0))
    run = Run(
        SAESpec(0, "x", 64, target_l0=4),
        p,
        Objective("jumprelu", coefficient=0.1),
        {n: torch.zeros_like(q) for n, q in p.named_parameters()},
        torch.zeros(64, dtype=torch.int64),
    )
    x = torch.randn(128, 16)
    forward_backward(p, x, x, run.objective)
    W_before = p.W_dec.detach().clone()
    adam_update(run, 1e-2, TrainConfig(tokens=10_000, batch_size=128), 0)
    torch.testing.assert_close(p.W_dec.norm(dim=1), torch.ones(64))
    assert not torch.allclose(p.W_dec, W_before)


@pytest.mark.parametrize("mode", ["raw", "center", "standardize"])
def test_folding_the_input_scale_leaves_encodings_unchanged(tmp_path, mode):
    x = sparse_data(n=8192, scale=50.0) + 3.0 * torch.randn(32)  # a large constant direction
    x[:, 5] *= 30.0  # one massive dimension, as in Gemma's residual stream
    spec = SAESpec(0, "resid_post", 128, "jumprelu", l0_coefficient=1e-3)
    cfg = TrainConfig(tokens=8192 * 2, center=mode == "center", standardize=mode == "standardize",
                      **FAST)  # fmt: skip
    from gemmascope.train import loop as train_mod

    captured = {}
    real_export = train_mod.export

    def spy(run, norms, cfg):  # export folds the normalisation into the run's own tensors
        captured["params"], captured["norm"] = copy.deepcopy(run.params), norms[SITE]
        return real_export(run, norms, cfg)

    train_mod.export = spy
    try:
        sae = train([spec], tensor_batches({SITE: x}, 512), cfg, tmp_path, progress=False)[
            spec.name
        ]
    finally:
        train_mod.export = real_export
    p, norm = captured["params"], captured["norm"]
    first = torch.cat(
        [b[SITE] for _, b in zip(range(8), tensor_batches({SITE: x}, 512)(0), strict=False)]
    )
    mu = first.mean(0) if mode != "raw" else torch.zeros(32)
    dims = torch.ones(32)
    if mode == "standardize":  # each dimension by its std, rescaled to root mean square 1
        std = (first - mu).pow(2).mean(0).sqrt()
        dims = std / std.pow(2).mean().sqrt()
    c = float(((first - mu) / dims).pow(2).sum(-1).mean().sqrt())
    torch.testing.assert_close(norm.mean, mu)
    torch.testing.assert_close(norm.divisor(), c * dims, rtol=1e-5, atol=0.0)
    normalised = norm(first)
    assert float(normalised.pow(2).sum(-1).mean()) == pytest.approx(1.0, rel=1e-4)
    if mode == "standardize":  # every dimension weighs alike in the loss
        torch.testing.assert_close(
            normalised.pow(2).mean(0), torch.full((32,), 1 / 32), rtol=1e-3, atol=0
        )
    with torch.no_grad():
        pre = ((x - mu) / (c * dims)) @ p.W_enc + p.b_enc
        z_norm = pre * (pre > p.threshold)
        torch.testing.assert_close(sae.encode(x), z_norm, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            sae.decode(z_norm), (z_norm @ p.W_dec + p.b_dec) * (c * dims) + mu, rtol=1e-4, atol=1e-3
        )
    assert sae.cfg.input_scale == 1.0


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    x = sparse_data(n=6000)
    specs = [
        SAESpec(0, "resid_post", 64, "jumprelu", target_l0=5),
        SAESpec(0, "resid_post", 64, "topk", k=5),
    ]
    cfg = TrainConfig(tokens=512 * 30, standardize=True, **{**FAST, "checkpoint_every": 10})
    full = train(specs, tensor_batches({SITE: x}, 512), cfg, tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def dying(start):
        for i, b in enumerate(tensor_batches({SITE: x}, 512)(start)):
            if start == 0 and i == 25:  # after the checkpoint at step 20
                raise Killed
            yield b

    with pytest.raises(Killed):
        train(specs, dying, cfg, tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="resume"):
        train(specs, dying, cfg, tmp_path / "cut", progress=False)
    resumed = train(specs, dying, cfg, tmp_path / "cut", resume=True, progress=False)
    for name, sae in full.items():
        for key, value in sae.state_arrays().items():
            torch.testing.assert_close(
                resumed[name].state_arrays()[key], value, rtol=1e-5, atol=1e-6, msg=key
            )


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_transcoder_predicts_another_site(tmp_path, skip):
    x = sparse_data(
        n=20_000, d=16, features=64, offset=0.3
    )  # not centred: the fold must shift b_dec
    g = torch.Generator().manual_seed(3)
    linear = x @ torch.randn(16, 16, generator=g)  # what a skip connection can carry alone
    y = torch.tanh(x) @ torch.randn(16, 16, generator=g) + (linear if skip else 0.0)
    spec = SAESpec(0, "mlp_in", 128, "topk", k=8, target_site="mlp_out", skip_connection=skip)
    cfg = TrainConfig(tokens=200_000, standardize=True, **FAST)
    sae = train(
        [spec], tensor_batches({(0, "mlp_in"): x, (0, "mlp_out"): y}, 512), cfg, tmp_path,
        progress=False,
    )[spec.name]  # fmt: skip
    with torch.no_grad():
        y_hat = sae(x)
        err = float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        err_vs_input = float((y_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert err < (0.1 if skip else 0.4)  # the mean predictor scores 1.0
    assert err_vs_input > 1.0  # it learned the target site, not the input
    assert (sae.cfg.site, sae.cfg.target_site, sae.cfg.skip_connection) == (
        "mlp_in",
        "mlp_out",
        skip,
    )
    assert spec.name.endswith("_skip_w128_topk_k8") == skip
    again = io.load(tmp_path / spec.name)
    with torch.no_grad():
        torch.testing.assert_close(again(x), y_hat)
    if skip:  # the skip carries the linear part: the latents alone fall far short
        with torch.no_grad():
            latents_only = sae.decode(sae.encode(x))
        assert float((latents_only - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) > 0.5


def test_skip_connections_are_for_transcoders():
    with pytest.raises(ValueError, match="`skip_connection` is for transcoders"):
        SAESpec(0, "resid_post", 64, "topk", k=4, skip_connection=True)
    with pytest.raises(ValueError, match="target_site must come after its site"):
        SAESpec(0, "mlp_out", 64, "topk", k=4, target_site="mlp_in")
    with pytest.raises(ValueError, match="target_site must come after its site"):
        SAESpec(0, "mlp_in", 64, "topk", k=4, target_site="mlp_in")


def test_sweep_trains_every_sae_from_one_read(tmp_path):
    x = sparse_data(n=4096)
    reads = []

    def counting(start):
        for b in tensor_batches({SITE: x}, 512)(start):
            reads.append(1)
            yield b

    specs = expand_sweep([0], ["resid_post"], [32, 64], target_l0s=[3, 6])
    assert len(specs) == 4
    cfg = TrainConfig(tokens=512 * 12, **FAST)
    saes = train(specs, counting, cfg, tmp_path, progress=False)
    assert len(saes) == 4 and len(reads) == 12
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "cfg.json").exists()) == sorted(
        s.name for s in specs
    )


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="l0_coefficient"):
        SAESpec(0, "resid_post", 32, "jumprelu")
    with pytest.raises(ValueError, match="needs `k`"):
        SAESpec(0, "resid_post", 32, "topk")
    with pytest.raises(ValueError, match="less than one batch"):
        TrainConfig(tokens=10, batch_size=512)
    x = sparse_data(n=2048)
    with pytest.raises(ValueError, match="no layer 3 site 'mlp_out'"):
        train(
            [SAESpec(3, "mlp_out", 32, k=4, architecture="topk")],
            tensor_batches({SITE: x}, 512),
            TrainConfig(tokens=2048, **FAST),
            tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="at least one sparsity"):
        expand_sweep([0], ["resid_post"], [32])


@pytest.mark.slow
def test_jumprelu_on_real_gemma3_activations(tmp_path, gemma_layer6_cache):
    """Layer 6 resid_post of the real Gemma 3 270M on the default corpus: FVU < 0.2 at L0 ~ 30."""
    from gemmascope.activations import CacheConfig, CachedActivations, build_cache

    key = (6, "resid_post")
    eval_cache = build_cache(CacheConfig(out=tmp_path / "eval", layers="6", sites=["resid_post"],
                                         tokens=6_000, split="eval"), progress=False)  # fmt: skip
    data = {}
    for split, path in (("train", gemma_layer6_cache), ("eval", eval_cache)):
        batches = CachedActivations(path, key, batch_size=4096, epochs=1).batches()
        data[split] = torch.cat([b[key] for b in batches])
    spec = SAESpec(6, "resid_post", 1024, "jumprelu", target_l0=30)
    cfg = TrainConfig(tokens=240_000, batch_size=1024, lr=2e-3, log_every=20,
                      model="gemma-3-270m")  # fmt: skip
    sae = train(
        [spec], tensor_batches({key: data["train"]}, 1024), cfg, tmp_path / "run", progress=False
    )[spec.name]
    held_out = data["eval"]
    assert fvu(sae, held_out) < 0.2
    assert 15 < l0(sae, held_out) < 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_cuda_trains_the_same_saes_as_the_cpu(tmp_path, arch):
    x = sparse_data(n=8192)
    kw = {"target_l0": 5} if arch == "jumprelu" else {"k": 5}
    spec = SAESpec(0, "resid_post", 64, arch, **kw)
    saes = {
        device: train(
            [spec],
            tensor_batches({SITE: x}, 512),
            TrainConfig(tokens=512 * 20, center=True, device=device, **FAST),
            tmp_path / device,
            progress=False,
        )[spec.name]
        for device in ("cpu", "cuda")
    }
    held_out = x[:1000]
    torch.testing.assert_close(
        saes["cuda"].cpu().encode(held_out), saes["cpu"].encode(held_out), rtol=1e-3, atol=1e-3
    )


def _cli_cache(tmp_path, tiny_folder, layer: int):
    """A tiny model's activations at `layer`, cached by `gemmascope cache` from a word corpus."""
    from typer.testing import CliRunner

    from gemmascope.cli import app

    corpus, cache = tmp_path / "words.txt", tmp_path / "cache"
    corpus.write_text(" ".join(f"w{3 + i % 60}" for i in range(3000)))
    result = CliRunner().invoke(app, ["cache", "--model", str(tiny_folder), "--layers", str(layer),
                                      "--tokens", "1024", "--corpus", str(corpus),
                                      "--context-size", "16", "--out", str(cache)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return cache


def test_cli_standardize_reaches_the_trainer_and_the_exported_sae(tmp_path, tiny_folder):
    from typer.testing import CliRunner

    from gemmascope.cli import app

    cache = _cli_cache(tmp_path, tiny_folder, layer=0)
    result = CliRunner().invoke(app, ["train", "--activations", str(cache), "--layers", "0",
                                      "--sites", "resid_post", "--widths", "64", "--target-l0", "5",
                                      "--tokens", "512", "--batch-size", "128", "--standardize",
                                      "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]
    assert saved["standardize"] and not saved["center"]
    (folder,) = [p.parent for p in (tmp_path / "run").rglob("cfg.json")]
    sae = io.load(folder)
    assert sae.cfg.extra["train_config"]["standardize"]


def test_cli_gemma_scope_2_options_reach_the_spec(tmp_path, tiny_folder):
    """`--l0-size` resolves with the cache's layer count; `--matryoshka` and `--frequency-penalty`
    reach the SAE's recorded spec and config."""
    from typer.testing import CliRunner

    from gemmascope.cli import app
    from gemmascope.train import named_l0

    cache = _cli_cache(tmp_path, tiny_folder, layer=1)
    result = CliRunner().invoke(app, ["train", "--activations", str(cache), "--layers", "1",
                                      "--widths", "64", "--l0-size", "small", "--matryoshka", "16",
                                      "--frequency-penalty", "0.2", "--tokens", "512",
                                      "--batch-size", "128", "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    (folder,) = [p.parent for p in (tmp_path / "run").rglob("cfg.json")]
    assert folder.name == "layer_1_resid_post_w64_jumprelu_matryoshka_l0_small"
    extra = io.load(folder).cfg.extra
    n_layers = json.loads((cache / "manifest.json").read_text())["identity"]["model"]["n_layers"]
    assert extra["spec"]["target_l0"] == named_l0("small", 1, n_layers)
    assert extra["spec"]["matryoshka"] == [16] and extra["train_config"]["frequency_penalty"] == 0.2


def test_toml_sweeps_read_on_python_3_10_through_tomli(tmp_path, monkeypatch):
    """Python 3.10 has no `tomllib`; the same parser comes as `tomli` (a dependency there)."""
    import sys

    import tomllib

    from gemmascope.train import load_sweep

    file = tmp_path / "sweep.toml"
    file.write_text('[train]\nlr = 0.002\n[[saes]]\nlayer = 6\nsite = "resid_post"\nwidth = "1k"\n'
                    'architecture = "topk"\nk = 8\n')  # fmt: skip
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    specs, options, _ = load_sweep(file)
    assert [s.width for s in specs] == [1024] and options == {"lr": 0.002}


def test_a_sweep_file_of_train_options_alone_takes_the_saes_from_flags(tmp_path):
    from gemmascope.train import Grid
    from gemmascope.train.job import TrainJob, run_job

    spec = tmp_path / "sweep.yaml"
    spec.write_text("train: {tokens: 1024, batch_size: 256, lr: 0.004}\n")
    grid = Grid(layers="0", widths=[64], k=[4], architecture="topk")
    job = TrainJob(out=tmp_path / "run", spec=spec, grid=grid, activations=tmp_path / "acts")
    with pytest.raises(FileNotFoundError, match="acts/manifest.json"):  # the SAEs were accepted
        run_job(job)
    with pytest.raises(ValueError, match="no SAEs to train"):
        run_job(TrainJob(out=tmp_path / "run", spec=spec, activations=tmp_path / "acts"))


def test_docs_named_in_docstrings_exist():
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    named = {
        m
        for p in (root / "src").rglob("*.py")
        for m in re.findall(r"docs/[\w/.-]+\.md", p.read_text())
    }
    missing = sorted(n for n in named if not (root / n).exists())
    assert not missing, missing


def test_named_l0_sizes_are_gemma_scope_2s_per_layer_targets(tmp_path):
    """The targets Gemma Scope 2 lists for its Gemma 3 releases (its config.json `l0` values)."""
    from gemmascope.train import named_l0

    assert [named_l0("small", layer, 18) for layer in range(8)] == [10, 11, 13, 15, 16, 18, 20, 20]
    assert [named_l0("big", layer, 18) for layer in range(7)] == [60, 70, 80, 90, 100, 110, 120]
    assert named_l0("medium", 12, 48) == 52  # gemma-3-12b layer 12
    assert named_l0("medium", 22, 26) == 60 and named_l0("small", 13, 26) == 20  # gemma-3-1b
    spec = SAESpec(3, "resid_post", 256, l0_size="small")
    assert spec.name.endswith("_l0_small") and spec.target_l0 is None
    assert spec.resolve(18).target_l0 == 15
    with pytest.raises(ValueError, match="layer count"):
        train([spec], tensor_batches({SITE: sparse_data(n=1024)}, 512),
              TrainConfig(tokens=1024, **FAST), tmp_path, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="unknown `l0_size`"):
        SAESpec(3, "resid_post", 256, l0_size="huge")


def test_recipes_fill_the_options_left_unset():
    short, paper = TrainConfig(), TrainConfig(recipe="paper")
    assert (short.lr, short.threshold_lr, short.encoder_init_scale, short.standardize) == (
        2e-3, 10.0, 0.1, True)  # fmt: skip
    assert (paper.lr, paper.threshold_lr, paper.encoder_init_scale, paper.standardize) == (
        7e-5, 1.0, 1.0, False)  # fmt: skip
    assert TrainConfig(recipe="paper", lr=1e-3).lr == 1e-3  # a value given wins
    assert TrainConfig(center=True).standardize is False  # centring alone, as asked
    # the frequency ceiling never fights a narrow SAE's target: at least 4 x target / width
    from gemmascope.train.state import new_run

    assert new_run(SAESpec(0, "x", 4096, target_l0=50), 8, short, 0).objective.max_frequency == 0.1
    assert new_run(SAESpec(0, "x", 64, target_l0=8), 8, short, 0).objective.max_frequency == 0.5


def test_a_sweep_files_recipe_is_not_overridden_by_flag_defaults(tmp_path, monkeypatch):
    """Flags left unset must not carry the short recipe's values over a file's `recipe: paper`."""
    import gemmascope.train.job as job_module
    from gemmascope.train import Grid
    from gemmascope.train.job import TrainFlags, TrainJob, run_job

    made = []

    class Recorded(TrainConfig):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(job_module, "TrainConfig", Recorded)
    spec = tmp_path / "sweep.yaml"
    spec.write_text("train: {tokens: 1024, batch_size: 256, recipe: paper}\n")
    grid = Grid(layers="0", widths=[64], k=[4], architecture="topk")
    for flags, given, lr in ((TrainFlags(), set(), 7e-5), (TrainFlags(lr=1e-3), {"lr"}, 1e-3)):
        job = TrainJob(out=tmp_path / "run", spec=spec, grid=grid, activations=tmp_path / "acts",
                       train=flags, given=frozenset(given))  # fmt: skip
        with pytest.raises(FileNotFoundError):  # no cache there: the config was made by then
            run_job(job)
        assert (made[-1].recipe, made[-1].lr, made[-1].standardize) == ("paper", lr, False)


def test_matryoshka_prefixes_reconstruct_on_their_own(tmp_path):
    """The first 64 latents of a Matryoshka SAE reconstruct far better than the first 64 of a
    plain SAE trained alike, and the whole dictionary nearly as well."""
    x = sparse_data()
    plain = SAESpec(0, "resid_post", 256, target_l0=6)
    nested = SAESpec(0, "resid_post", 256, target_l0=6, matryoshka=[64])
    cfg = TrainConfig(tokens=200_000, **FAST)
    saes = train([plain, nested], tensor_batches({SITE: x[:30_000]}, 512), cfg, tmp_path,
                 progress=False)  # fmt: skip
    held_out = x[30_000:]

    def prefix_fvu(sae, width):
        with torch.no_grad():
            z = sae.encode(held_out)[:, :width]
            x_hat = z @ sae.W_dec[:width] + sae.b_dec
        return float((x_hat - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())

    a, b = saes[plain.name], saes[nested.name]
    assert nested.name.endswith("_jumprelu_matryoshka_l0_6")
    assert prefix_fvu(b, 64) < 0.8 * prefix_fvu(a, 64), (prefix_fvu(b, 64), prefix_fvu(a, 64))
    assert fvu(b, held_out) < max(1.5 * fvu(a, held_out), 0.2)
    with pytest.raises(ValueError, match="must increase and stay below the width"):
        SAESpec(0, "resid_post", 256, target_l0=6, matryoshka=[64, 256])


def test_frequency_penalty_keeps_latents_under_the_ceiling(tmp_path):
    """Data with a direction present on 40% of tokens: without the penalty latents fire on up to
    18% of tokens; with a ceiling of 10%, none fires on more than 10% (measured 9.3%)."""
    g = torch.Generator().manual_seed(0)
    x = sparse_data(n=20_000)
    common = torch.randn(32, generator=g)
    x += 5 * (torch.rand(len(x), 1, generator=g) < 0.4) * common / common.norm()
    spec = SAESpec(0, "resid_post", 256, target_l0=6)
    density = {}
    for coefficient in (0.0, 1.0):
        cfg = TrainConfig(tokens=100_000, frequency_penalty=coefficient, max_frequency=0.1, **FAST)
        (sae,) = train([spec], tensor_batches({SITE: x}, 512), cfg, tmp_path / str(coefficient),
                       progress=False).values()  # fmt: skip
        with torch.no_grad():
            density[coefficient] = (sae.encode(x) != 0).float().mean(0)
    assert density[0.0].max() > 0.15, density[0.0].max()
    assert density[1.0].max() <= 0.1, density[1.0].max()


def test_cli_trains_and_evaluates_a_skip_transcoder(tmp_path, tiny_folder):
    """cache mlp_in and mlp_out -> train `--sites mlp_in --target-site mlp_out --skip-connection`
    -> eval: the record scores the model with its MLP replaced."""
    from typer.testing import CliRunner

    from gemmascope.cli import app
    from gemmascope.evaluate import read_results
    from gemmascope.evaluate.results import site_label

    corpus, cache = tmp_path / "words.txt", tmp_path / "cache"
    corpus.write_text(" ".join(f"w{3 + i % 60}" for i in range(3000)))
    run = CliRunner().invoke
    result = run(app, ["cache", "--model", str(tiny_folder), "--layers", "1", "--sites",
                       "mlp_in,mlp_out", "--tokens", "1024", "--corpus", str(corpus),
                       "--context-size", "16", "--out", str(cache)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run(app, ["train", "--activations", str(cache), "--layers", "1", "--sites", "mlp_in",
                       "--target-site", "mlp_out", "--skip-connection", "--widths", "64",
                       "--target-l0", "5", "--tokens", "2048", "--batch-size", "128",
                       "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    (folder,) = [p.parent for p in (tmp_path / "run").rglob("cfg.json")]
    assert folder.name == "layer_1_mlp_in_to_mlp_out_skip_w64_jumprelu_l0_5"
    sae = io.load(folder)
    assert (sae.cfg.target_site, sae.cfg.skip_connection) == ("mlp_out", True)
    assert float(sae.W_skip.abs().max()) > 0  # the skip learned
    out = tmp_path / "results.json"
    result = run(app, ["eval", str(folder), "--model", str(tiny_folder), "--corpus", str(corpus),
                       "--split", "all", "--tokens", "64", "--context-size", "16",
                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (r,) = read_results(out)
    assert (r["site"], r["target_site"], r["skip_connection"]) == ("mlp_in", "mlp_out", True)
    assert site_label(r) == "mlp_in->mlp_out+skip"  # how tables and the report name it
    assert r["fvu"] < 1.0  # better than the mean of the MLP's output
