"""The `gemmascope` command line: one subcommand per step of model -> activations -> SAE -> metrics.

Each command is a config dataclass (its fields are the flags, see `gemmascope.common.config`) and a
library call; the configs of the pipeline's steps live with the steps, the few that only the command
line needs (what to print, where to listen) live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

import gemmascope
from gemmascope.activations import CacheConfig
from gemmascope.cli.circuits import register as register_circuits
from gemmascope.cli.flags import command, fail
from gemmascope.cli.interop import register as register_interop
from gemmascope.common.config import check, nested, option
from gemmascope.evaluate.job import EvalJob
from gemmascope.explore.index import IndexConfig
from gemmascope.models import Site
from gemmascope.suite.config import SuiteConfig
from gemmascope.train.job import TrainJob

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
    version: Optional[bool] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """gemmascope: sparse autoencoders for every layer and site of a language model."""


def _echo(item: Any, err: bool = False) -> None:
    """Print a rich table (or anything rich prints), to stderr with `err`."""
    from rich.console import Console

    Console(stderr=err).print(item)


# --- sae-info, list-saes, convert: SAE files in every format (gemmascope.io) ---------------------
@dataclass
class SAESource:
    source: str = option(positional=True)
    """params.npz, SAE folder, or Hugging Face repo id."""
    sae_id: str | None = None
    """Which SAE of a folder or repo holding several."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("sae-info"), SAESource)
def sae_info(cfg: SAESource) -> None:
    """Print the config of one SAE as a table."""
    from rich.table import Table

    from gemmascope import io

    sae = io.load(cfg.source, cfg.sae_id)
    table = Table("field", "value", title=cfg.source + (f" [{cfg.sae_id}]" if cfg.sae_id else ""))
    for key, value in sae.cfg.to_dict().items():
        table.add_row(key, "" if value is None else str(value))
    _echo(table)


@dataclass
class Folder:
    source: str = option(positional=True)
    """A folder or Hugging Face repo id."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("list-saes"), Folder)
def list_saes(cfg: Folder) -> None:
    """List the SAE ids of a folder or repo, one a line (pass one as --sae-id)."""
    from gemmascope import io

    typer.echo("\n".join(io.list_sae_ids(cfg.source)))


@dataclass
class Convert:
    source: str = option(positional=True)
    """SAE file, folder or Hugging Face repo id."""
    dest: Path = option(positional=True)
    """Folder (or .npz file) to write."""
    to: str = option("gemmascope", required=True)
    """saelens, gemmascope, npz, sparsify, dictionary_learning, gemmascope2, or circuit_tracer (a
    set: every MLP transcoder of the source, one per layer)."""
    sae_id: str | None = None
    """Which SAE of a folder or repo holding several (for circuit_tracer: text the ids contain)."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("convert"), Convert)
def convert(cfg: Convert) -> None:
    """Convert an SAE between formats (the source's is detected); refuses what would change it."""
    from gemmascope import io

    out = io.convert(cfg.source, cfg.dest, cfg.to, sae_id=cfg.sae_id)
    typer.echo(f"wrote {out} ({cfg.to})")


# --- model: a model's layers and site widths, and real activations at one site -------------------
@dataclass
class ModelRun:
    model: str = "gemma-3-270m"
    """`gemma-3-270m` (embedded, no network), a hub name or a local folder."""
    text: str | None = None
    """Run the model on this text and summarise the activations at --layer/--site."""
    layer: int | None = None
    """Layer to read with --text."""
    site: Site = "resid_post"
    """Site to read with --text."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, mps, or auto (a GPU if there is one)."""

    def __post_init__(self) -> None:
        if (self.text is None) != (self.layer is None):
            raise ValueError(
                "--text and --layer go together: pass both to read activations, or neither"
            )
        check(self)


@command(app.command("model"), ModelRun)
def model(cfg: ModelRun) -> None:
    """Print a model's family, layers and site widths; with --text, real activations at one site."""
    from rich.table import Table

    from gemmascope.hooks import collect
    from gemmascope.models import SITES, check_site, load_model, model_info

    lm, tokenizer = load_model(cfg.model, device=cfg.device)
    info = model_info(lm)
    typer.echo(f"{cfg.model}: family {info.family}, {info.n_layers} layers (0..{info.n_layers - 1}), "
               f"d_model {info.d_model}, {info.n_heads} heads x {info.head_dim}")  # fmt: skip
    table = Table("site", "width", "value", title="sites (every layer)")
    for name in SITES:
        table.add_row(name, str(info.site_width(name)), _SITE_HELP[name])
    _echo(table)
    if cfg.text is None or cfg.layer is None:
        return
    check_site(info, cfg.layer, cfg.site)
    batch = tokenizer(cfg.text, return_tensors="pt")
    key = (cfg.layer, cfg.site)
    acts = collect(lm, batch["input_ids"], [key], attention_mask=batch.get("attention_mask"))
    x = acts[key][0].float()  # (seq, width)
    norms = x.norm(dim=-1)  # (seq,)
    stats = Table(
        "statistic", "value", title=f"layer {cfg.layer} {cfg.site} on {len(norms)} tokens"
    )
    stats.add_row("shape", str(tuple(acts[key].shape)))
    stats.add_row("norm mean", f"{norms.mean():.4g}")
    if len(norms) > 1:  # the first token (BOS) is often an outlier, so show the rest on their own
        stats.add_row("norm mean, first token left out", f"{norms[1:].mean():.4g}")
    stats.add_row("norm max", f"{norms.max():.4g}")
    stats.add_row("value mean / std", f"{x.mean():.4g} / {x.std():.4g}")
    _echo(stats)


_SITE_HELP = {
    "resid_pre": "residual stream entering the block",
    "mlp_in": "what the MLP reads (its input norm's output); transcoders read it",
    "resid_post": "residual stream leaving the block",
    "attn_out": "what attention adds to the residual stream",
    "mlp_out": "what the MLP adds to the residual stream",
    "attn_z": "concatenated head outputs, before the output projection",
}


# --- cache, train, eval: the pipeline (gemmascope.activations, .train, .evaluate) ---------------
@command(app.command("cache"), CacheConfig)
def cache(cfg: CacheConfig) -> None:
    """Run the model over a corpus and store activations of every (layer, site) in one pass."""
    import json

    from gemmascope.activations import build_cache
    from gemmascope.common.config import flat
    from gemmascope.common.distributed import is_main

    if is_main():  # under torchrun, one rank speaks
        typer.echo(json.dumps(flat(cfg)), err=True)
    build_cache(cfg)
    if is_main():
        typer.echo(f"cache complete: {cfg.tokens:,} tokens in {cfg.out}")


@command(app.command("train"), TrainJob)
def train(job: TrainJob, given: frozenset[str]) -> None:
    """Train many SAEs (sites x layers x widths x sparsities) from one read of the activations."""
    import dataclasses

    from gemmascope.train.job import run_job

    for name in run_job(dataclasses.replace(job, given=given)):
        typer.echo(f"saved {job.out / name}")


@command(app.command("eval"), EvalJob)
def evaluate(job: EvalJob) -> None:
    """Score SAEs on held-out tokens: L0, FVU, MSE, cosine, delta LM loss, loss recovered, dead/dense."""
    from gemmascope.evaluate.job import run_eval
    from gemmascope.evaluate.results import results_table

    records = run_eval(job)
    _echo(results_table(records, title=f"{records[0]['tokens']:,} tokens; written to {job.out}"))


# --- index, explore: what every latent means, in a local browser (gemmascope.explore) ----------
@command(app.command("index"), IndexConfig)
def index(cfg: IndexConfig) -> None:
    """Run an SAE over a corpus and write a feature index for `gemmascope explore`."""
    import json

    from gemmascope.common.config import flat
    from gemmascope.explore.index import build_index

    typer.echo(json.dumps(flat(cfg)), err=True)
    build_index(cfg)
    typer.echo(f"index written: {cfg.out} (open it with `gemmascope explore {cfg.out}`)")


@dataclass
class Explore:
    sources: list[Path] = option(positional=True)
    """A suite folder (`gemmascope suite`), a folder of index files, or index files
    (`gemmascope index`)."""
    host: str = "127.0.0.1"
    """Address to bind; anything but localhost exposes it to others."""
    port: int = option(8000, ge=1, le=65535)
    """Port to listen on."""
    allow_host: list[str] = option(default_factory=list)
    """More names the explorer answers to, as others type them in the address bar (with --host
    0.0.0.0, this machine's name or address on the network)."""
    device: str = "auto"
    """Torch device for the models and SAEs, loaded on first use."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("explore"), Explore)
def explore(cfg: Explore) -> None:
    """Browse a suite's SAEs (or index files) in a local web app: the grid of SAEs, features,
    search, the prompt heat-map, neighbours, explanations and steering.

    Only requests naming 127.0.0.1, localhost, ::1, the --host or an --allow-host are served
    (a web page elsewhere cannot reach it through DNS rebinding).
    """
    try:
        import uvicorn

        from gemmascope.explore.app import DEFAULT_HOSTS, create_app
    except ImportError as e:
        fail(f"the explorer needs fastapi, uvicorn and jinja2 ({e}); pip install them")
        return
    from gemmascope.common.devices import resolve_device

    web = create_app(
        cfg.sources, device=str(resolve_device(cfg.device)),
        hosts=(*DEFAULT_HOSTS, cfg.host, *cfg.allow_host),
    )  # fmt: skip
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(
            f"warning: serving on {cfg.host}: the explorer has no login, so anyone who can reach "
            f"{cfg.host}:{cfg.port} can read the indexes, write explanations into them and run the model",
            err=True,
            fg=typer.colors.YELLOW,
        )
    typer.echo(f"gemmascope explorer on http://{cfg.host}:{cfg.port}/ (Ctrl+C to stop)")
    uvicorn.run(web, host=cfg.host, port=cfg.port, log_level="warning")


# --- report, publish: an HTML page; Gemma Scope's layout and a model card (gemmascope.report, .publish)
@dataclass
class Report:
    results: list[Path] = option(positional=True)
    """Results files written by `gemmascope eval --out`."""
    out: Path = option(Path("report"), required=True)
    """Report folder: index.html and its PNG figures."""
    title: str = ""
    """Page title (default: the models evaluated)."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("report"), Report)
def report(cfg: Report) -> None:
    """Draw evaluation results as one HTML page with figures, viewable offline."""
    from gemmascope.report import build_report

    typer.echo(f"report written: {build_report(cfg.results, cfg.out, title=cfg.title)}")


@dataclass
class Publish:
    suite: Path = option(positional=True)
    """Folder of trained SAEs, e.g. a `gemmascope train` run."""
    out: Path = option(positional=True)
    """Folder to write: {site}/layer_L/width_W/average_l0_N/."""
    results: Path = option(Path("results.json"), required=True)
    """`gemmascope eval` results of the suite (measured L0 and metrics)."""
    saelens: bool = False
    """Also write a SAELens-format copy under saelens/."""
    repo_id: str | None = None
    """Upload the folder to this Hugging Face repo (`org/name`)."""
    license: str = "apache-2.0"
    """Licence id for the model card."""
    base_model: str | None = None
    """Hub id of the model the SAEs read (default: from the SAEs' config)."""
    overwrite: bool = False
    """Replace OUT if it exists and is not empty."""

    def __post_init__(self) -> None:
        check(self)


@command(app.command("publish"), Publish)
def publish(cfg: Publish) -> None:
    """Lay out a suite of SAEs as Gemma Scope did, with a model card; --repo-id uploads it."""
    from gemmascope.publish import publish as publish_suite

    folder = publish_suite(cfg.suite, cfg.out, results=cfg.results, saelens=cfg.saelens,
                           repo_id=cfg.repo_id, license=cfg.license, base_model=cfg.base_model,
                           overwrite=cfg.overwrite)  # fmt: skip
    typer.echo(f"published {folder}" + (f" and uploaded to {cfg.repo_id}" if cfg.repo_id else ""))


register_circuits(app, _echo)  # graph: attribution graphs (gemmascope.circuits)
register_interop(app, _echo)  # export-neuronpedia, import-examples (gemmascope.explore)


# --- suite: plan, cache, train, evaluate, publish and report a whole suite (gemmascope.suite) ----
suite_app = typer.Typer(
    help="Build a whole Gemma Scope-style suite with one command; `suite status DIR` shows progress.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(suite_app, name="suite")


@dataclass
class SuiteRun:
    suite: SuiteConfig = nested(SuiteConfig)
    """The suite."""
    dry_run: bool = False
    """Measure and print the plan (disk, memory, time); run nothing."""


@command(suite_app.callback(invoke_without_command=True), SuiteRun, group=True)
def suite(run: SuiteRun) -> None:
    """Plan, cache, train, evaluate, publish and report every SAE of a grid; resumable."""
    from gemmascope.suite import build_suite

    build_suite(run.suite, dry_run=run.dry_run)
    if not run.dry_run:
        out = run.suite.out
        typer.echo(f"suite complete: {out / 'publish'} (report: {out / 'report' / 'index.html'})")


@dataclass
class SuiteFolder:
    folder: Path = option(positional=True)
    """A suite folder (`gemmascope suite --out`)."""

    def __post_init__(self) -> None:
        check(self)


@command(suite_app.command("status"), SuiteFolder)
def suite_status(cfg: SuiteFolder) -> None:
    """Show what is done, running and left in a suite, with an ETA."""
    from gemmascope.suite import status_table

    _echo(status_table(cfg.folder))
