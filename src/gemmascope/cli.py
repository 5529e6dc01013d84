"""The `gemmascope` command line: one subcommand per step of model -> activations -> SAE -> metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import gemmascope

app = typer.Typer(
    name="gemmascope",
    help="Train, load, evaluate and explore sparse autoencoders on every layer and site of a model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemmascope {gemmascope.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """gemmascope: sparse autoencoders for every layer and site of a language model."""


# Options that several subcommands share, declared once.
ModelOption = Annotated[
    str, typer.Option(help="`gemma-3-270m` (embedded), a hub name or a local folder.")
]
CorpusOption = Annotated[
    str,
    typer.Option(help="`default`, a .txt/.jsonl/.parquet file, folder or glob, or a HF dataset."),
]
TextColumnOption = Annotated[str, typer.Option(help="Text field of .jsonl/.parquet/HF rows.")]
EvalFractionOption = Annotated[float, typer.Option(help="Share of documents held out.")]
ContextSizeOption = Annotated[int, typer.Option(help="Tokens per sequence, BOS included.")]


def fail(message: str) -> None:
    """Print a clear error (no traceback) and exit with status 2."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _device(name: str) -> str:
    """`--device` resolved: `auto` becomes this process's GPU if there is one, else the CPU."""
    from gemmascope.distributed import resolve_device

    return str(resolve_device(name))


# Subcommands are registered below, one block per step of the data flow.
_ = Path


# ---------------------------------------------------------------- sae-info, list-saes (gemmascope.io)
@app.command("sae-info")
def sae_info(
    source: Annotated[str, typer.Argument(help="params.npz, SAE folder, or Hugging Face repo id.")],
    sae_id: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option("--sae-id", help="Which SAE of a folder or repo holding several."),
    ] = None,
) -> None:
    """Print the config of one SAE as a table."""
    from rich.console import Console
    from rich.table import Table

    from gemmascope import io

    try:
        sae = io.load(source, sae_id)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
        return
    table = Table("field", "value", title=f"{source}" + (f" [{sae_id}]" if sae_id else ""))
    for key, value in sae.cfg.to_dict().items():
        table.add_row(key, "" if value is None else str(value))
    Console().print(table)


@app.command("list-saes")
def list_saes(
    source: Annotated[str, typer.Argument(help="A folder or Hugging Face repo id.")],
) -> None:
    """List the SAE ids of a folder or repo, one a line (pass one as --sae-id)."""
    from gemmascope import io

    try:
        ids = io.list_sae_ids(source)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
        return
    typer.echo("\n".join(ids))


@app.command("convert")
def convert_command(
    source: Annotated[str, typer.Argument(help="SAE file, folder or Hugging Face repo id.")],
    dest: Annotated[Path, typer.Argument(help="Folder (or .npz file) to write.")],
    to: Annotated[
        str,
        typer.Option(
            help="saelens, gemmascope, npz, sparsify, dictionary_learning or gemmascope2."
        ),
    ],
    sae_id: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option("--sae-id", help="Which SAE of a folder or repo holding several."),
    ] = None,
) -> None:
    """Convert an SAE between formats (the source's is detected); refuses what would change it."""
    from gemmascope import io

    try:
        out = io.convert(source, dest, to, sae_id=sae_id)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
        return
    typer.echo(f"wrote {out} ({to})")


# --- model: a model's layers and site widths, and real activations at one site -------------------

_SITE_HELP = {
    "resid_pre": "residual stream entering the block",
    "resid_post": "residual stream leaving the block",
    "attn_out": "what attention adds to the residual stream",
    "mlp_out": "what the MLP adds to the residual stream",
    "attn_z": "concatenated head outputs, before the output projection",
}


@app.command("model")
def model_command(
    model: Annotated[
        str,
        typer.Option(help="`gemma-3-270m` (embedded, no network), a hub name or a local folder."),
    ] = "gemma-3-270m",
    text: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(
            help="Run the model on this text and summarise the activations at --layer/--site."
        ),
    ] = None,
    layer: Annotated[
        Optional[int],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(help="Layer to read with --text."),
    ] = None,
    site: Annotated[str, typer.Option(help="Site to read with --text.")] = "resid_post",
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N, mps.")] = "cpu",
) -> None:
    """Print a model's family, layers and site widths; with --text, real activations at one site."""
    from rich.console import Console
    from rich.table import Table

    from gemmascope.hooks import collect
    from gemmascope.models import SITES, check_site, load_model, model_info

    if (text is None) != (layer is None):
        fail("--text and --layer go together: pass both to read activations, or neither")
    if site not in SITES:
        fail(f"unknown --site {site!r}; choose one of {list(SITES)}")
    try:
        lm, tokenizer = load_model(model, device=_device(device))
    except (RuntimeError, ValueError) as e:
        fail(str(e))
        return
    info = model_info(lm)
    console = Console()
    console.print(
        f"[bold]{model}[/bold]: family {info.family}, {info.n_layers} layers (0..{info.n_layers - 1}), "
        f"d_model {info.d_model}, {info.n_heads} heads x {info.head_dim}"
    )
    table = Table("site", "width", "value", title="sites (every layer)")
    for name in SITES:
        table.add_row(name, str(info.site_width(name)), _SITE_HELP[name])
    console.print(table)
    if text is None or layer is None:
        return
    try:
        check_site(info, layer, site)
    except ValueError as e:
        fail(str(e))
        return
    batch = tokenizer(text, return_tensors="pt")
    acts = collect(
        lm, batch["input_ids"], [(layer, site)], attention_mask=batch.get("attention_mask")
    )
    x = acts[layer, site][0].float()  # (seq, width)
    norms = x.norm(dim=-1)  # (seq,)
    stats = Table("statistic", "value", title=f"layer {layer} {site} on {len(norms)} tokens")
    stats.add_row("shape", str(tuple(acts[layer, site].shape)))
    stats.add_row("norm mean", f"{norms.mean():.4g}")
    if len(norms) > 1:  # the first token (BOS) is often an outlier, so show the rest on their own
        stats.add_row("norm mean, first token left out", f"{norms[1:].mean():.4g}")
    stats.add_row("norm max", f"{norms.max():.4g}")
    stats.add_row("value mean / std", f"{x.mean():.4g} / {x.std():.4g}")
    console.print(stats)


# --- cache: activations of every hooked (layer, site) on disk, resumable (gemmascope.activations) ---
@app.command("cache")
def cache_command(
    out: Annotated[Path, typer.Option(help="Cache folder; rerun the same command to resume it.")],
    model: ModelOption = "gemma-3-270m",
    layers: Annotated[str, typer.Option(help="Layers: `all`, `0-17`, `3,6,9`.")] = "all",
    sites: Annotated[
        str,
        typer.Option(
            help="Comma-separated sites: resid_pre, resid_post, mlp_out, attn_out, attn_z."
        ),
    ] = "resid_post",
    tokens: Annotated[str, typer.Option(help="Vectors per (layer, site), e.g. 250k, 5M.")] = "1M",
    corpus: CorpusOption = "default",
    text_column: TextColumnOption = "text",
    split: Annotated[
        str, typer.Option(help="`train`, or `eval` (the held-out documents).")
    ] = "train",
    eval_fraction: EvalFractionOption = 0.02,
    context_size: ContextSizeOption = 1024,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 8,
    dtype: Annotated[
        str, typer.Option(help="Storage dtype: float32, bfloat16, float16.")
    ] = "float32",
    keep_special: Annotated[
        bool, typer.Option(help="Also cache BOS/EOS/pad positions (Gemma Scope did not).")
    ] = False,
    shard_tokens: Annotated[
        Optional[int],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(help="Tokens per shard (default: about 1 GiB per shard)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Torch device for the model: cpu, cuda, cuda:N, mps or auto.")
    ] = "auto",
    verify: Annotated[
        bool,
        typer.Option(help="On resume, check every existing shard's sha256, not only its size."),
    ] = False,
) -> None:
    """Run the model over a corpus and store activations of every (layer, site) in one pass."""
    import json

    from gemmascope.activations import CacheConfig, build_cache, config_dict, parse_count
    from gemmascope.distributed import is_main

    try:
        cfg = CacheConfig(
            out=out, model=model, layers=layers, sites=[s.strip() for s in sites.split(",") if s.strip()],
            tokens=parse_count(tokens), corpus=corpus, text_column=text_column, split=split,  # type: ignore[arg-type]
            eval_fraction=eval_fraction, context_size=context_size, batch_size=batch_size, dtype=dtype,
            keep_special=keep_special, shard_tokens=shard_tokens, device=device, verify=verify,
        )  # fmt: skip
        if is_main():  # under torchrun, one rank speaks
            typer.echo(json.dumps(config_dict(cfg)), err=True)
        build_cache(cfg)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        fail(str(e))
        return
    if is_main():
        typer.echo(f"cache complete: {cfg.tokens:,} tokens in {cfg.out}")


# --- train: a sweep of SAEs from one read of the activations (gemmascope.train) ---
def _floats(text: str | None) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()] if text else []


@app.command("train")
def train_command(
    out: Annotated[
        Path, typer.Option(help="Run folder: metrics.jsonl, checkpoint/, one folder per SAE.")
    ],
    spec: Annotated[
        Optional[Path],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(
            help="Sweep file (YAML/TOML): `saes`, `sweep`, `train`, `source`. Flags add to it."
        ),
    ] = None,
    activations: Annotated[
        Optional[Path],  # noqa: UP007, UP045
        typer.Option(help="Read a cache written by `gemmascope cache` (else stream from --model)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model to stream activations from (no cache).")
    ] = "gemma-3-270m",
    corpus: Annotated[str, typer.Option(help="Corpus when streaming from the model.")] = "default",
    layers: Annotated[str, typer.Option(help="Layers of the grid: `6`, `0-17`, `3,6,9`.")] = "",
    sites: Annotated[str, typer.Option(help="Sites of the grid, comma-separated.")] = "resid_post",
    widths: Annotated[str, typer.Option(help="Widths of the grid: `4k,16k`.")] = "16k",
    architecture: Annotated[
        str, typer.Option(help="jumprelu, topk, batchtopk or relu.")
    ] = "jumprelu",
    target_l0: Annotated[str | None, typer.Option(help="Target L0s (jumprelu): `20,50`.")] = None,  # noqa: UP007, UP045
    l0_coefficient: Annotated[Optional[str], typer.Option(help="Lambdas: `1e-3,3e-3`.")] = None,  # noqa: UP007, UP045
    k: Annotated[Optional[str], typer.Option(help="k values (topk/batchtopk): `32,64`.")] = None,  # noqa: UP007, UP045
    target_site: Annotated[
        Optional[str],  # noqa: UP007, UP045
        typer.Option(help="Train transcoders: reconstruct this site of the same layer."),
    ] = None,
    tokens: Annotated[Optional[str], typer.Option(help="Training tokens, e.g. 2M.")] = None,  # noqa: UP007, UP045
    batch_size: Annotated[Optional[int], typer.Option(help="Tokens per step (4096).")] = None,  # noqa: UP007, UP045
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (7e-5).")] = None,  # noqa: UP007, UP045
    matmul_dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            "--matmul-dtype",
            help="Dense products: float32, bfloat16 or float16 (weights stay float32).",
        ),
    ] = None,  # noqa: UP007, UP045
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto (a GPU if there is one).")
    ] = None,  # noqa: UP007, UP045
    parallel: Annotated[
        str | None,
        typer.Option(help="Under torchrun: split batches (data) or each SAE's latents (latents)."),
    ] = None,  # noqa: UP007, UP045
    encoder_init_scale: Annotated[
        Optional[float],  # noqa: UP007, UP045
        typer.Option(help="W_enc = scale * W_dec^T at init (recipe 1; 0.1 for short runs)."),
    ] = None,
    center: Annotated[
        Optional[bool],  # noqa: UP007, UP045
        typer.Option(
            "--center/--no-center",
            help="Subtract each site's mean before training, folded back after (not in the recipe).",
        ),
    ] = None,
    standardize: Annotated[
        Optional[bool],  # noqa: UP007, UP045
        typer.Option(
            "--standardize/--no-standardize",
            help="Centre and divide each dimension by its std in training, folded back after "
            "(not in the recipe; lowers ΔLM loss where a few dimensions dominate).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for init and data order.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its checkpoint.")
    ] = False,
) -> None:
    """Train many SAEs (sites x layers x widths x sparsities) from one read of the activations."""
    import dataclasses as dc

    from gemmascope.activations import parse_count
    from gemmascope.distributed import is_main
    from gemmascope.train import TrainConfig, expand_sweep, load_sweep, parse_width, train

    try:
        specs, options, source = load_sweep(spec) if spec else ([], {}, {})
        if layers:
            from gemmascope.models import parse_layers

            grid_layers = parse_layers(layers, 10**6)
            specs += expand_sweep(
                grid_layers, [s.strip() for s in sites.split(",")], [parse_width(w) for w in widths.split(",")],
                architecture=architecture, target_l0s=_floats(target_l0),
                l0_coefficients=_floats(l0_coefficient), ks=[int(v) for v in _floats(k)],
                target_site=target_site,
            )  # fmt: skip
        if not specs:
            fail(
                "no SAEs to train: pass --spec FILE or --layers with a sparsity (--target-l0, --k, ...)"
            )
        flags = {"tokens": parse_count(tokens) if tokens else None, "batch_size": batch_size, "lr": lr,
                 "matmul_dtype": matmul_dtype, "device": device, "parallel": parallel, "encoder_init_scale": encoder_init_scale, "center": center,
                 "standardize": standardize}  # fmt: skip
        options.update({k_: v for k_, v in flags.items() if v is not None}, seed=seed)
        TrainConfig(**options)  # bad options (device, dtype, ...) fail here, before any loading
        activations = activations or (
            Path(source["activations"]) if "activations" in source else None
        )
        keys = sorted({key for s in specs for key in (s.source, s.target)})
        if activations is not None:
            from gemmascope.loader import CachedActivations

            data = CachedActivations(
                activations, keys, batch_size=options.get("batch_size", 4096), seed=seed
            )
            ident = data.manifest["identity"]
            options.setdefault("model", ident.get("model", {}).get("name"))
            options.setdefault("context_size", ident.get("context_size"))
            options.setdefault("dataset", str(ident.get("corpus", {}).get("source", "")) or None)
        else:
            from gemmascope.distributed import resolve_device
            from gemmascope.loader import ModelActivations
            from gemmascope.models import load_model

            name = source.get("model", model)
            lm, tok = load_model(name, device=resolve_device(options.get("device", "auto")))
            data = ModelActivations(lm, tok, keys, corpus=source.get("corpus", corpus),
                                    batch_size=options.get("batch_size", 4096), seed=seed)  # fmt: skip
            options.setdefault("model", name)
            options.setdefault("dataset", source.get("corpus", corpus))
            options.setdefault("context_size", data.context_size)
        cfg = TrainConfig(**options)
        if is_main():  # under torchrun, one rank speaks
            typer.echo(
                f"training {len(specs)} SAE(s) on {cfg.tokens:,} tokens: {dc.asdict(cfg)}",
                err=True,
            )
        saes = train(specs, data.batches, cfg, out, resume=resume)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        fail(str(e))
        return
    for name in saes:
        typer.echo(f"saved {out / name}")


# --- eval: metrics of many SAEs on held-out tokens, one clean forward per batch (gemmascope.evaluate) ---
@app.command("eval")
def eval_command(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="params.npz files, SAE folders, folders of SAEs (a training run) or hub repos."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Results file (JSON), written atomically.")],
    sae_id: Annotated[
        Optional[list[str]],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(
            "--sae-id",
            help="Which SAE of each source (repeat for several); default: all of a folder.",
        ),
    ] = None,
    model: ModelOption = "gemma-3-270m",
    corpus: CorpusOption = "default",
    text_column: TextColumnOption = "text",
    split: Annotated[
        str, typer.Option(help="`eval` (held-out documents), `train` or `all`.")
    ] = "eval",
    eval_fraction: EvalFractionOption = 0.02,
    tokens: Annotated[
        str, typer.Option(help="Tokens to forward, e.g. 100k (whole sequences).")
    ] = "100k",
    context_size: ContextSizeOption = 1024,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 8,
    ablations: Annotated[
        bool, typer.Option(help="Run zero and mean ablation (for the fraction of loss recovered).")
    ] = True,
    ce_chunk: Annotated[
        int,
        typer.Option(help="Positions per cross-entropy chunk (memory ~ 2 x chunk x vocab x 4 B)."),
    ] = 512,
    device: Annotated[
        str, typer.Option(help="Torch device: cpu, cuda, cuda:N, mps, auto.")
    ] = "cpu",
) -> None:
    """Score SAEs on held-out tokens: L0, FVU, MSE, cosine, delta LM loss, loss recovered, dead/dense."""
    from rich.console import Console
    from rich.table import Table

    from gemmascope import io
    from gemmascope.activations import parse_count
    from gemmascope.evaluate import evaluate, expand_sources, write_results
    from gemmascope.models import load_model

    settings = {"model": model, "corpus": corpus, "text_column": text_column, "split": split,
                "eval_fraction": eval_fraction, "tokens": tokens, "context_size": context_size,
                "batch_size": batch_size, "ablations": ablations}  # fmt: skip
    try:
        pairs = expand_sources(sources, sae_id or [])
        device = _device(device)
        saes = [io.load(src, sid, device=device) for src, sid in pairs]
        lm, tokenizer = load_model(model, device=device)
        typer.echo(f"evaluating {len(saes)} SAE(s): {settings}", err=True)
        records = evaluate(
            lm, tokenizer, saes, corpus=corpus, split=split, tokens=parse_count(tokens),  # type: ignore[arg-type]
            context_size=context_size, batch_size=batch_size, text_column=text_column,
            eval_fraction=eval_fraction, ablations=ablations, ce_chunk=ce_chunk, model_name=model,
        )  # fmt: skip
        for record, (src, sid) in zip(records, pairs, strict=True):
            record.update(source=src, sae_id=sid)
        write_results(out, records, settings)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        fail(str(e))
        return
    table = Table("sae", "layer", "site", "width", "L0", "FVU", "dLM loss", "recovered", "dead",
                  title=f"{records[0]['tokens']:,} tokens; written to {out}")  # fmt: skip
    for r in records:
        rec = r["frac_recovered"]
        table.add_row(
            f"{r['source']}" + (f" [{r['sae_id']}]" if r["sae_id"] else ""), str(r["layer"]),
            r["site"], str(r["width"]), f"{r['l0']:.1f}", f"{r['fvu']:.4f}",
            f"{r['delta_lm_loss']:.4f}", "-" if rec is None else f"{rec:.3f}", str(r["dead"]),
        )  # fmt: skip
    Console().print(table)


# --- index, explore: what every latent means, in a local browser (gemmascope.explore) ---
@app.command("index")
def index_command(
    sae_source: Annotated[
        str, typer.Argument(help="params.npz, SAE folder or Hugging Face repo id.")
    ],
    out: Annotated[
        Path, typer.Option(help="The .sqlite index to write; rerun the same command to resume.")
    ],
    sae_id: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option("--sae-id", help="Which SAE of a folder or repo holding several."),
    ] = None,
    model: ModelOption = "gemma-3-270m",
    layer: Annotated[
        Optional[int],  # noqa: UP007, UP045
        typer.Option(help="Layer the SAE reads (default: from its config)."),
    ] = None,
    site: Annotated[
        Optional[str],  # noqa: UP007, UP045
        typer.Option(help="Site the SAE reads (default: from its config)."),
    ] = None,
    corpus: CorpusOption = "default",
    split: Annotated[str, typer.Option(help="`train`, `eval` or `all` documents.")] = "train",
    text_column: TextColumnOption = "text",
    tokens: Annotated[str, typer.Option(help="Positions to run over, e.g. 250k, 1M.")] = "1M",
    context_size: ContextSizeOption = 1024,
    batch_size: Annotated[int, typer.Option(help="Sequences per chunk.")] = 4,
    top_k: Annotated[int, typer.Option(help="Top activating contexts kept per latent.")] = 20,
    window: Annotated[int, typer.Option(help="Tokens kept each side of an activation.")] = 16,
    bands: Annotated[int, typer.Option(help="Octave bands below the top that are sampled.")] = 4,
    samples: Annotated[int, typer.Option(help="Contexts sampled per band.")] = 3,
    bins: Annotated[int, typer.Option(help="Histogram bins (a power of two).")] = 64,
    lens_k: Annotated[int, typer.Option(help="Logit-lens tokens kept at each end.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the band sampling.")] = 0,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="Save progress at most this often (seconds).")
    ] = 60.0,
    device: Annotated[
        str, typer.Option(help="Torch device for the model and SAE: cpu, cuda, cuda:N, mps, auto.")
    ] = "cpu",
) -> None:
    """Run an SAE over a corpus and write a feature index for `gemmascope explore`."""
    import dataclasses as dc
    import json

    from gemmascope.activations import parse_count
    from gemmascope.explore.index import IndexConfig, build_index

    try:
        cfg = IndexConfig(
            sae_source=sae_source, out=out, sae_id=sae_id, model=model, layer=layer, site=site,
            corpus=corpus, split=split, text_column=text_column, tokens=parse_count(tokens),  # type: ignore[arg-type]
            context_size=context_size, batch_size=batch_size, top_k=top_k, window=window,
            bands=bands, samples=samples, bins=bins, lens_k=lens_k, seed=seed,
            checkpoint_seconds=checkpoint_seconds, device=_device(device),
        )  # fmt: skip
        typer.echo(json.dumps(dc.asdict(cfg), default=str), err=True)
        build_index(cfg)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        fail(str(e))
        return
    typer.echo(f"index written: {out} (open it with `gemmascope explore {out}`)")


@app.command("explore")
def explore_command(
    index: Annotated[Path, typer.Argument(help="An index written by `gemmascope index`.")],
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but localhost exposes it to others.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[
        str, typer.Option(help="Torch device for the model and SAE, loaded on first use.")
    ] = "cpu",
) -> None:
    """Browse an index in a local web app: features, "what fires here" and steering."""
    try:
        import uvicorn

        from gemmascope.explore.app import create_app
    except ImportError as e:
        fail(f"the explorer needs fastapi, uvicorn and jinja2 ({e}); pip install them")
        return
    try:
        web = create_app(index, device=_device(device))
    except (OSError, ValueError) as e:
        fail(str(e))
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(
            f"warning: serving on {host}: the explorer has no login, so anyone who can reach "
            f"{host}:{port} can read the index and run the model",
            err=True,
            fg=typer.colors.YELLOW,
        )
    typer.echo(f"gemmascope explorer on http://{host}:{port}/ (Ctrl+C to stop)")
    uvicorn.run(web, host=host, port=port, log_level="warning")


# --- report: an HTML page with Pareto fronts, metrics by layer and feature density (gemmascope.report) ---
@app.command("report")
def report_command(
    results: Annotated[
        list[Path], typer.Argument(help="Results files written by `gemmascope eval --out`.")
    ],
    out: Annotated[Path, typer.Option(help="Report folder: index.html and its PNG figures.")],
    title: Annotated[str, typer.Option(help="Page title (default: the models evaluated).")] = "",
) -> None:
    """Draw evaluation results as one HTML page with figures, viewable offline."""
    from gemmascope.report import build_report

    try:
        index = build_report(results, out, title=title)
    except (OSError, ValueError, ImportError) as e:
        fail(str(e))
        return
    typer.echo(f"report written: {index}")


# --- publish: Gemma Scope's layout, a model card, optionally the hub (gemmascope.publish) ---
@app.command("publish")
def publish_command(
    suite: Annotated[
        Path, typer.Argument(help="Folder of trained SAEs, e.g. a `gemmascope train` run.")
    ],
    out: Annotated[
        Path, typer.Argument(help="Folder to write: {site}/layer_L/width_W/average_l0_N/.")
    ],
    results: Annotated[
        Path, typer.Option(help="`gemmascope eval` results of the suite (measured L0 and metrics).")
    ],
    saelens: Annotated[
        bool, typer.Option(help="Also write a SAELens-format copy under saelens/.")
    ] = False,
    repo_id: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(help="Upload the folder to this Hugging Face repo (`org/name`)."),
    ] = None,
    license: Annotated[str, typer.Option(help="Licence id for the model card.")] = "apache-2.0",
    base_model: Annotated[
        Optional[str],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(help="Hub id of the model the SAEs read (default: from the SAEs' config)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT if it exists and is not empty.")
    ] = False,
) -> None:
    """Lay out a suite of SAEs as Gemma Scope did, with a model card; --repo-id uploads it."""
    from gemmascope.publish import publish

    try:
        folder = publish(
            suite, out, results=results, saelens=saelens, repo_id=repo_id, license=license,
            base_model=base_model, overwrite=overwrite,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        fail(str(e))
        return
    typer.echo(f"published {folder}" + (f" and uploaded to {repo_id}" if repo_id else ""))


# --- suite: plan, cache, train, evaluate, publish and report a whole suite, resumable (gemmascope.suite) ---
suite_app = typer.Typer(
    help="Build a whole Gemma Scope-style suite with one command; `suite status DIR` shows progress.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(suite_app, name="suite")


@suite_app.callback(invoke_without_command=True)
def suite_command(
    ctx: typer.Context,
    out: Annotated[
        Optional[Path],  # noqa: UP007, UP045 - typer needs Optional on 3.10
        typer.Option(help="Suite folder; rerun the same command to resume it."),
    ] = None,
    model: ModelOption = "gemma-3-270m",
    sites: Annotated[
        str, typer.Option(help="Comma-separated sites: resid_post, mlp_out, attn_z, ...")
    ] = "resid_post",
    layers: Annotated[str, typer.Option(help="Layers: `all`, `0-17`, `3,6,9`.")] = "all",
    widths: Annotated[str, typer.Option(help="SAE widths: `4k,16k`.")] = "16k",
    l0: Annotated[str, typer.Option(help="Target L0s, one JumpReLU SAE each: `20,50,100`.")] = "50",
    tokens: Annotated[
        str, typer.Option(help="Tokens cached and trained on per (layer, site), e.g. 2M.")
    ] = "2M",
    train_tokens: Annotated[
        Optional[str],  # noqa: UP007, UP045
        typer.Option(help="Tokens each SAE trains on (default --tokens; more loop the cache)."),
    ] = None,
    eval_tokens: Annotated[str, typer.Option(help="Held-out tokens per evaluation.")] = "20k",
    ablations: Annotated[
        bool, typer.Option(help="Zero/mean ablation in evaluation (loss recovered).")
    ] = True,
    corpus: CorpusOption = "default",
    text_column: TextColumnOption = "text",
    eval_fraction: EvalFractionOption = 0.02,
    context_size: ContextSizeOption = 1024,
    model_batch_size: Annotated[int, typer.Option(help="Sequences per model forward.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Tokens per training step.")] = 4096,
    lr: Annotated[float, typer.Option(help="Adam learning rate (short runs: ~2e-3).")] = 7e-5,
    matmul_dtype: Annotated[
        str, typer.Option(help="Dense training products: float32, bfloat16, float16.")
    ] = "float32",
    encoder_init_scale: Annotated[
        float, typer.Option(help="W_enc = scale * W_dec^T at init (0.1 suits short runs).")
    ] = 1.0,
    center: Annotated[
        bool,
        typer.Option(help="Subtract each site's mean in training, folded back (short runs)."),
    ] = False,
    standardize: Annotated[
        bool,
        typer.Option(help="Centre and divide each dimension by its std in training, folded back."),
    ] = False,
    cache_dtype: Annotated[
        str, typer.Option(help="Cache storage: float32, bfloat16, float16.")
    ] = "float32",
    buffer_size: Annotated[int, typer.Option(help="Vectors shuffled together.")] = 1 << 19,
    checkpoint_every: Annotated[
        int, typer.Option(help="Training steps between checkpoints.")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Seed for init and data order.")] = 0,
    saelens: Annotated[bool, typer.Option(help="Also publish a SAELens copy.")] = False,
    base_model: Annotated[
        Optional[str],  # noqa: UP007, UP045
        typer.Option(help="Hub id for the model card (default: from --model)."),
    ] = None,
    disk_budget: Annotated[
        Optional[str],  # noqa: UP007, UP045
        typer.Option(help="Disk the suite may use, e.g. 50G (default: the free space)."),
    ] = None,
    keep_cache: Annotated[
        bool, typer.Option(help="Keep activation caches after training.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N, mps, or auto (the GPU if there is one).")
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option(help="Measure and print the plan (disk, memory, time); run nothing.")
    ] = False,
) -> None:
    """Plan, cache, train, evaluate, publish and report every SAE of a grid; resumable."""
    if ctx.invoked_subcommand is not None:
        return
    from gemmascope.activations import parse_count
    from gemmascope.suite import SuiteConfig, build_suite, parse_bytes
    from gemmascope.train import parse_width

    if out is None:
        fail("--out is required: the suite folder (or run `gemmascope suite status DIR`)")
        return
    try:
        cfg = SuiteConfig(
            out=out, model=model, sites=[s.strip() for s in sites.split(",") if s.strip()],
            layers=layers, widths=[parse_width(w) for w in widths.split(",") if w.strip()],
            target_l0s=_floats(l0), tokens=parse_count(tokens),
            train_tokens=parse_count(train_tokens) if train_tokens else None,
            eval_tokens=parse_count(eval_tokens), center=center, standardize=standardize,
            ablations=ablations, corpus=corpus, text_column=text_column, eval_fraction=eval_fraction,
            context_size=context_size, model_batch_size=model_batch_size, batch_size=batch_size,
            lr=lr, matmul_dtype=matmul_dtype, encoder_init_scale=encoder_init_scale,
            cache_dtype=cache_dtype, buffer_size=buffer_size,
            checkpoint_every=checkpoint_every, seed=seed, saelens=saelens, base_model=base_model,
            disk_budget=parse_bytes(disk_budget) if disk_budget else None, keep_cache=keep_cache,
            device=device,
        )  # fmt: skip
        build_suite(cfg, dry_run=dry_run)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        fail(str(e))
        return
    if not dry_run:
        typer.echo(f"suite complete: {out / 'publish'} (report: {out / 'report' / 'index.html'})")


@suite_app.command("status")
def suite_status_command(
    folder: Annotated[Path, typer.Argument(help="A suite folder (`gemmascope suite --out`).")],
) -> None:
    """Show what is done, running and left in a suite, with an ETA."""
    from rich.console import Console

    from gemmascope.suite_status import status_table

    try:
        table = status_table(folder)
    except (OSError, ValueError, KeyError) as e:
        fail(str(e))
        return
    Console().print(table)
