"""Publish a suite of trained SAEs the way Gemma Scope did, with a model card, optionally to the hub.

Layout of the output folder (one folder per site, as Gemma Scope has one repo per site):

    README.md                                         model card: YAML front matter + metrics table
    eval_results.json                                 the evaluation records of the published SAEs
    {site}/layer_{L}/width_{W}/average_l0_{N}/params.npz
    saelens/{site}/layer_{L}/width_{W}/average_l0_{N}/{cfg.json, sae_weights.safetensors}  (--saelens)

`W` is Gemma Scope's width label (16384 -> `16k`) and `N` the mean L0 measured by `gemmascope eval`,
rounded. Gemma Scope's `params.npz` holds a JumpReLU only: relu SAEs go in as JumpReLU with threshold
0 and batchtopk in its inference form (a JumpReLU), both with identical encodings. A topk SAE has no
such form, so its folder holds our own format (`cfg.json` + `sae.safetensors`) instead of
`params.npz`; `gemmascope.load` reads either from the same kind of path. Every published SAE is
loaded back and its encodings compared before the folder is put in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from gemmascope.common.files import atomic_dir
from gemmascope.evaluate import read_results, write_results
from gemmascope.io import list_sae_ids, load
from gemmascope.io.gemmascope_npz import write_npz
from gemmascope.io.hub import is_repo_id
from gemmascope.io.native import write_native
from gemmascope.io.saelens import write_saelens
from gemmascope.report import width_label
from gemmascope.sae import SAE

KNOWN_BASE_MODELS = {"gemma-3-270m": "google/gemma-3-270m"}
"""Short model names gemmascope uses, and the hub ids a model card's `base_model` needs."""


@dataclass
class _Entry:
    """One SAE of the suite and where it goes."""

    sae: SAE
    source_id: str
    record: dict[str, Any]
    sae_id: str  # layer_{L}/width_{W}/average_l0_{N}, inside the site folder

    @property
    def path(self) -> str:
        return f"{self.sae.cfg.site}/{self.sae_id}"

    @property
    def format(self) -> str:
        return "gemmascope" if self.sae.cfg.architecture == "topk" else "npz"


def publish(
    suite: str | Path,
    out: str | Path,
    *,
    results: str | Path,
    saelens: bool = False,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Lay out every SAE of `suite` as Gemma Scope did, write a model card, and optionally upload.

    Args:
        suite: a folder of SAEs, e.g. a `gemmascope train` run folder.
        out: the folder to write, atomically; refused if it exists and is not empty, unless
            `overwrite`.
        results: `gemmascope eval` results covering every SAE of the suite (the L0 in each folder
            name and the card's metrics come from it).
        saelens: also write a SAELens-format copy under `saelens/`.
        repo_id: upload `out` to this Hugging Face model repo (`org/name`), creating it if needed.
        license: the card's licence (a Hugging Face licence id).
        base_model: hub id of the model the SAEs read (default: from the SAEs' `cfg.model`).
        overwrite: replace an existing, non-empty `out`.
    Returns:
        The output folder.
    """
    suite, out = Path(suite), Path(out)
    if not suite.is_dir():
        raise ValueError(f"{suite}: not a folder; pass the folder holding the suite's SAEs")
    if suite.resolve() == out.resolve() or suite.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{out}: would replace the suite {suite} itself; choose another folder")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise ValueError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
    records = read_results(results)
    entries = [_entry(suite, sae_id, records, results) for sae_id in list_sae_ids(suite)]
    _check_unique(entries)
    base = base_model or _base_model(entries)
    with atomic_dir(out) as tmp:
        for e in entries:
            if e.format == "npz":
                write_npz(e.sae, tmp / e.path)
            else:
                write_native(e.sae, tmp / e.path)
            if saelens:
                write_saelens(e.sae, tmp / "saelens" / e.path)
        _verify(tmp, entries, saelens)
        published = [{**e.record, "source": str(e.sae.cfg.site), "sae_id": e.sae_id, "model": base}
                     for e in entries]  # fmt: skip
        write_results(tmp / "eval_results.json", published, {"published_by": "gemmascope publish"})
        (tmp / "README.md").write_text(model_card(entries, base, license, saelens, repo_id))
    if repo_id:
        upload(out, repo_id, message=f"gemmascope publish: {len(entries)} SAEs")
    return out


def upload(folder: str | Path, repo_id: str, *, message: str = "gemmascope publish") -> str:
    """Upload `folder` to the Hugging Face model repo `repo_id`, creating the repo if needed.

    Uses the token `huggingface_hub` finds (`hf auth login` or `HF_TOKEN`). Returns the commit URL.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"repo id {repo_id!r}: expected `org/name`")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message
        )
    except Exception as e:  # the hub client raises many types; all mean the upload did not happen
        raise RuntimeError(
            f"{repo_id}: uploading {folder} failed ({type(e).__name__}: {e}). Check the repo name, "
            "the network and your token (`hf auth login` or HF_TOKEN); the local copy is complete"
        ) from e
    return str(getattr(commit, "commit_url", commit))


def _entry(
    suite: Path, source_id: str, records: list[dict[str, Any]], results: str | Path
) -> _Entry:
    sae = load(suite, None if source_id == "." else source_id)
    c = sae.cfg
    where = f"{suite} [{source_id}]"
    if c.layer is None or c.site is None:
        raise ValueError(
            f"{where}: the SAE does not record its layer and site, which name its folder"
        )
    folder = (suite / source_id).resolve()
    same_path = [r for r in records if r.get("source") is not None
                 and (Path(r["source"]) / (r.get("sae_id") or "")).resolve() == folder]  # fmt: skip
    same_id = [r for r in records if r.get("sae_id") == (None if source_id == "." else source_id)]
    found = same_path or same_id
    if len(found) != 1:
        raise ValueError(
            f"{where}: {results} holds {len(found)} results for this SAE, expected one; evaluate the "
            f"suite with `gemmascope eval {suite} --out RESULTS` and pass that file"
        )
    r = found[0]
    mine = {"layer": c.layer, "site": c.site, "width": c.d_sae, "architecture": c.architecture}
    theirs = {k: r.get(k) for k in mine}
    if mine != theirs:
        raise ValueError(
            f"{where}: the result in {results} describes another SAE ({theirs}, this one is {mine}); "
            "re-run `gemmascope eval` on this suite"
        )
    n = math.floor(r["l0"] + 0.5)
    return _Entry(sae, source_id, r, f"layer_{c.layer}/width_{width_label(c.d_sae)}/average_l0_{n}")


def _check_unique(entries: list[_Entry]) -> None:
    seen: dict[str, _Entry] = {}
    for e in entries:
        if e.path in seen:
            raise ValueError(
                f"SAEs {seen[e.path].source_id!r} and {e.source_id!r} would both be published as "
                f"{e.path} (same site, layer, width and rounded L0); publish them in separate suites"
            )
        seen[e.path] = e


def _base_model(entries: list[_Entry]) -> str:
    names = sorted({str(e.sae.cfg.model) for e in entries})
    if len(names) != 1:
        raise ValueError(
            f"the suite's SAEs read different models {names}; publish one model's SAEs"
        )
    name = KNOWN_BASE_MODELS.get(names[0], names[0])
    if not is_repo_id(name) or Path(name).exists():
        raise ValueError(
            f"the SAEs' model {names[0]!r} is not a Hugging Face hub id; pass base_model "
            "(--base-model), e.g. `google/gemma-3-270m`"
        )
    return name


def _verify(folder: Path, entries: list[_Entry], saelens: bool) -> None:
    """Load every published SAE back and compare its encodings with the original's."""
    g = torch.Generator().manual_seed(0)
    for e in entries:
        x = torch.randn(256, e.sae.cfg.d_in, generator=g) * 3  # (256, d_in)
        with torch.no_grad():
            want = e.sae.eval().encode(x)
            copies = [(e.path, load(folder / str(e.sae.cfg.site), e.sae_id))]
            if saelens:
                copies.append(
                    (f"saelens/{e.path}", load(folder / "saelens" / str(e.sae.cfg.site), e.sae_id))
                )
            for where, sae in copies:
                got = sae.encode(x)
                if not torch.allclose(
                    got, want.to(got.dtype), rtol=1e-4, atol=1e-5 * float(want.abs().max() + 1)
                ):
                    raise RuntimeError(
                        f"{where}: loads back with different encodings than {e.source_id}; "
                        "nothing was published. Please report this"
                    )


def model_card(
    entries: list[_Entry], base_model: str, license: str, saelens: bool, repo_id: str | None
) -> str:
    """README.md: YAML front matter for the hub, then the layout, how to load, and every SAE's metrics."""
    tags = ["sparse-autoencoder", "sae", "interpretability", "gemmascope"] + (
        ["saelens"] if saelens else []
    )
    front = yaml.safe_dump(
        {"license": license, "library_name": "gemmascope", "base_model": base_model, "tags": tags},
        sort_keys=False,
    )
    example = entries[0]
    where = repo_id or "PATH/TO/THIS/FOLDER"
    sites = sorted({str(e.sae.cfg.site) for e in entries})
    tokens = sorted({int(e.record.get("tokens") or 0) for e in entries})
    saelens_note = (
        "\nA SAELens-format copy of every SAE is under `saelens/` (same sub-paths); load one with "
        "`sae_lens.SAE.load_from_disk(folder)` after downloading it.\n"
        if saelens
        else ""
    )
    return f"""---
{front}---

# Sparse autoencoders for {base_model}

{len(entries)} sparse autoencoders trained with gemmascope on {base_model}, at sites
{", ".join(f"`{s}`" for s in sites)}, laid out as [Gemma Scope](https://arxiv.org/abs/2408.05147)
laid out its SAEs.

## Layout

`{{site}}/layer_{{L}}/width_{{W}}/average_l0_{{N}}/` holds one SAE: `W` is the number of latents
(`16k` = 16384) and `N` the mean number of active latents per token measured on held-out text.
JumpReLU, ReLU and BatchTopK SAEs are stored as Gemma Scope's `params.npz` (`W_enc`, `W_dec`,
`b_enc`, `b_dec`, `threshold`; `z = pre * (pre > threshold)` with `pre = x @ W_enc + b_enc`, and
`x_hat = z @ W_dec + b_dec`), which encodes them exactly. TopK SAEs, which `params.npz` cannot
express, are stored as `cfg.json` + `sae.safetensors` (gemmascope's format) in the same kind of folder.
{saelens_note}
## Loading

```python
import gemmascope

sae = gemmascope.load("{where}", sae_id="{example.path}")
# or, from a local copy, one site folder at a time as with a Gemma Scope repo:
sae = gemmascope.load("{where if not repo_id else "LOCAL/COPY"}/{example.sae.cfg.site}", sae_id="{example.sae_id}")
```

## SAEs

Measured by `gemmascope eval` on {", ".join(f"{t:,}" for t in tokens)} held-out tokens (BOS, EOS and
padding left out). FVU = Σ‖x − x̂‖² / Σ‖x − mean x‖²; ΔLM loss is the increase in next-token
cross-entropy (nats) with the reconstruction spliced in; loss recovered =
(CE_zero − CE_spliced) / (CE_zero − CE_clean). `eval_results.json` has every metric.

{_metrics_table(entries)}
"""


def _metrics_table(entries: list[_Entry]) -> str:
    """The card's markdown table, one row per SAE in site, layer, width, L0 order."""
    rows = [
        "| SAE | site | layer | width | architecture | format | L0 | FVU | ΔLM loss | loss recovered | dead | dense |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in sorted(
        entries, key=lambda e: (e.sae.cfg.site, e.sae.cfg.layer, e.sae.cfg.d_sae, e.record["l0"])
    ):
        r = e.record
        cells = [f"`{e.path}`", e.sae.cfg.site, e.sae.cfg.layer, width_label(e.sae.cfg.d_sae), e.sae.cfg.architecture,
                 e.format, r["l0"], r.get("fvu"), r.get("delta_lm_loss"), r.get("frac_recovered"), r.get("dead"), r.get("dense")]  # fmt: skip
        rows.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
