"""A suite report from evaluation results: one HTML page beside its PNG figures, viewable offline.

Figures (`figures`: matplotlib, drawn on bare `Figure`s with the Agg canvas, so no global backend is
changed):
- per site and width, every metric against L0 (ours and SAEBench's core ones), one line per layer
  coloured by layer: all layers of a site in one figure, as the Gemma Scope paper draws them;
- L0, FVU, delta LM loss and loss recovered by layer, coloured by site (with two layers or more);
- per site, the log10 feature-density histogram of every SAE, coloured by its L0.
Every string from the results is HTML-escaped; the page uses inline CSS and a few lines of inline
script (sorting the table by a column), and refers to the PNGs by relative name.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmascope.common.files import atomic_dir
from gemmascope.evaluate import read_results
from gemmascope.evaluate.results import site_label
from gemmascope.report.figures import (
    density_figures,
    l0_figures,
    layer_figure,
    metric,
    width_label,
)

Record = dict[str, Any]
_OURS = re.compile(r"(index\.html|[\w.-]+\.png)")
_COLUMNS: list[tuple[str, str, Callable[[Record], Any]]] = [
    ("SAE", "text", lambda r: r["_name"]),
    ("model", "text", lambda r: r.get("model")),
    ("layer", "num", lambda r: r.get("layer")),
    ("site", "text", site_label),
    ("width", "num", lambda r: r.get("width")),
    ("arch", "text", lambda r: r.get("architecture")),
    ("L0", "num", lambda r: r.get("l0")),
    ("FVU", "num", lambda r: r.get("fvu")),
    ("MSE", "num", lambda r: r.get("mse")),
    ("cosine", "num", lambda r: r.get("cosine")),
    ("ΔLM loss", "num", lambda r: r.get("delta_lm_loss")),
    ("recovered", "num", lambda r: r.get("frac_recovered")),
    ("ce_loss_score", "num", lambda r: metric(r, "ce_loss_score")),
    ("kl_div_score", "num", lambda r: metric(r, "kl_div_score")),
    ("dead", "num", lambda r: r.get("dead")),
    ("dense", "num", lambda r: r.get("dense")),
    ("tokens", "num", lambda r: r.get("tokens")),
]


def build_report(results: Sequence[str | Path], out: str | Path, *, title: str = "") -> Path:
    """Write `out/index.html` and its figures from one or more `gemmascope eval` result files.

    Args:
        results: files written by `gemmascope eval --out` (`evaluate.write_results`).
        out: the report folder, written atomically; an existing one is replaced only if it holds
            nothing but a previous report (index.html and PNGs).
        title: page title (default: the models evaluated).
    Returns:
        The path of `index.html`.
    """
    plt = _matplotlib()
    records: list[Record] = []
    for path in results:
        for r in read_results(path):
            records.append({**r, "_name": _name(r, len(records)), "_file": Path(path).name})
    if not records:
        raise ValueError(f"{', '.join(map(str, results))}: no results to report")
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(not _OURS.fullmatch(p.name) for p in out.iterdir())):
        raise ValueError(
            f"{out}: exists and is not a gemmascope report; the report replaces the whole folder, "
            "so pick a new or empty folder"
        )
    models = sorted({str(r.get("model")) for r in records})
    title = title or f"SAE evaluation: {', '.join(models)}"
    with atomic_dir(out) as tmp:
        layers = {r.get("layer") for r in records if r.get("layer") is not None}
        sections = [
            ("Metrics against L0", l0_figures(plt, records, tmp, len(models) > 1)),
            ("Metrics by layer", [layer_figure(plt, records, tmp)] if len(layers) > 1 else []),
            ("Feature density", density_figures(plt, records, tmp, len(models) > 1)),
        ]
        (tmp / "index.html").write_text(_page(title, records, sections, results), encoding="utf-8")
    return out / "index.html"


def _matplotlib() -> Any:
    try:
        import matplotlib.figure
    except ImportError:
        raise ImportError(
            "`gemmascope report` draws with matplotlib: `pip install matplotlib`"
        ) from None
    return matplotlib.figure


def _name(r: Record, i: int) -> str:
    sae_id, source = r.get("sae_id"), r.get("source")
    if sae_id:
        return str(sae_id)
    return Path(str(source)).name if source else f"SAE {i}"


# ---------------------------------------------------------------- page
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(records: list[Record]) -> str:
    """Every SAE a row; text columns equal on every row (model, architecture) are left out."""
    columns = [c for c in _COLUMNS if c[1] == "num" or c[0] == "SAE"
               or len({str(c[2](r)) for r in records}) > 1]  # fmt: skip
    head = "".join(
        f'<th data-kind="{kind}" class="{kind}" onclick="sortBy(this)">{html.escape(name)}'
        "<span></span></th>"
        for name, kind, _ in columns
    )
    rows = []
    for r in records:
        title = html.escape(f"{r.get('source')} [{r.get('sae_id')}] in {r['_file']}")
        cells = [f'<td class=text title="{title}">{html.escape(_fmt(r["_name"]))}</td>']
        for _, kind, get in columns[1:]:
            v = get(r)
            key = "" if v is None else str(v)
            cells.append(
                f'<td class={kind} data-v="{html.escape(key)}">{html.escape(_fmt(v))}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="saes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _page(
    title: str, records: list[Record], sections: list[tuple[str, list[tuple[str, str]]]],
    results: Sequence[str | Path],
) -> str:  # fmt: skip
    e = html.escape
    tokens = sorted({r.get("tokens") for r in records if r.get("tokens")})
    facts = [
        ("SAEs", f"{len(records)}"),
        ("sites", ", ".join(sorted({site_label(r) for r in records}))),
        ("layers", ", ".join(str(v) for v in sorted({r["layer"] for r in records if r.get("layer") is not None}))),
        ("widths", ", ".join(width_label(w) for w in sorted({r["width"] for r in records}))),
        ("eval tokens", ", ".join(f"{t:,}" for t in tokens)),
        ("results", ", ".join(Path(p).name for p in results)),
    ]  # fmt: skip
    cards = "".join(f"<div class=card><b>{e(v)}</b><span>{e(k)}</span></div>" for k, v in facts)
    body = []
    for heading, figures in sections:
        if not figures:
            continue
        body.append(f"<h2>{e(heading)}</h2>")
        for name, caption in figures:
            body.append(f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}'
                        "</figcaption></figure>")  # fmt: skip
    return _TEMPLATE.format(
        title=e(title), cards=cards, figures="\n".join(body), table=_table(records),
        css=_CSS, script=_SCRIPT,
    )  # fmt: skip


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}</style></head>
<body><main>
<h1>{title}</h1>
<div class=cards>{cards}</div>
<p class=note><b>L0</b>: mean latents active per token. <b>FVU</b>: Σ‖x − x̂‖² / Σ‖x − mean x‖².
<b>ΔLM loss</b>: next-token cross-entropy with the reconstruction spliced in, minus the clean one
(nats). <b>recovered</b>: (CE<sub>zero</sub> − CE<sub>spliced</sub>) / (CE<sub>zero</sub> − CE<sub>clean</sub>).
<b>dead</b>: latents never active; <b>dense</b>: active on more than 10% of tokens.
BOS, EOS and padding are left out of every metric.</p>
{figures}
<h2>All SAEs</h2>
<p class=note>Click a column to sort; hover a name for its source.</p>
<div class=scroll>{table}</div>
</main><script>{script}</script></body></html>
"""

_CSS = """
body{margin:0;background:#f6f7f9;color:#1d2330;font:14px/1.5 -apple-system,BlinkMacSystemFont,
"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 60px}
h1{font-size:24px;margin:0 0 16px}h2{font-size:18px;margin:36px 0 12px;padding-bottom:6px;
border-bottom:1px solid #dde1e8}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:14px}
.card{background:#fff;border:1px solid #e1e5ec;border-radius:8px;padding:10px 16px;min-width:110px}
.card b{display:block;font-size:17px}.card span{color:#667085;font-size:12px}
.note{color:#475467;font-size:13px;max-width:900px}
figure{background:#fff;border:1px solid #e1e5ec;border-radius:8px;margin:0 0 16px;padding:12px}
figure img{max-width:100%;display:block;margin:0 auto}
figcaption{color:#667085;font-size:12px;margin-top:6px;text-align:center}
.scroll{overflow-x:auto;background:#fff;border:1px solid #e1e5ec;border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{padding:6px 9px;border-bottom:1px solid #eef0f4;white-space:nowrap}
.num{text-align:right}.text{text-align:left}
th{position:sticky;top:0;background:#f0f2f6;cursor:pointer;user-select:none}
th span{color:#98a2b3;margin-left:4px}th span:after{content:"↕"}
th.asc span:after{content:"▲"}th.desc span:after{content:"▼"}
tbody tr:nth-child(even){background:#fafbfc}tbody tr:hover{background:#eef4ff}
td:first-child{max-width:300px;overflow:hidden;text-overflow:ellipsis}
"""

_SCRIPT = """
function sortBy(th){
  const table=th.closest('table'), body=table.tBodies[0], i=[...th.parentNode.children].indexOf(th);
  const num=th.dataset.kind==='num', asc=!th.classList.contains('asc');
  [...th.parentNode.children].forEach(h=>h.classList.remove('asc','desc'));
  th.classList.add(asc?'asc':'desc');
  const key=r=>{const c=r.children[i], v=c.dataset.v??c.textContent;
    return num?(v===''?Infinity:parseFloat(v)):v;};
  [...body.rows].sort((a,b)=>{const x=key(a),y=key(b); return (x<y?-1:x>y?1:0)*(asc?1:-1);})
    .forEach(r=>body.appendChild(r));
}
"""
