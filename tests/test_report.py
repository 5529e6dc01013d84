"""The HTML report: figures written and linked, every string escaped, folders guarded, the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gemmascope.evaluate import DENSITY_EDGES, write_results
from gemmascope.report import build_report, width_label

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def _record(layer: int, site: str, width: int, l0: float, **kw: Any) -> dict[str, Any]:
    counts = [0] * (len(DENSITY_EDGES) - 1)
    counts[-12:-4] = [1, 3, 8, 20, 30, 20, 8, 3]
    fvu = 1 / l0**0.5
    return {
        "source": "runs/sweep", "sae_id": f"layer_{layer}/{site}/w{width}/l0_{l0:g}",
        "model": "gemma-3-270m", "layer": layer, "site": site, "width": width, "d_in": 640,
        "architecture": "jumprelu", "tokens": 4096, "l0": l0, "fvu": fvu, "mse": fvu / 50,
        "cosine": 1 - fvu / 2, "delta_lm_loss": fvu, "frac_recovered": 1 - fvu / 5, "dead": 3,
        "dense": 0, "density_hist": {"log10_edges": DENSITY_EDGES, "counts": counts}, **kw,
    }  # fmt: skip


def _results(tmp_path: Path) -> Path:
    records = [_record(layer, site, width, l0) for layer in (2, 5) for site in ("resid_post", "mlp_out")
               for width in (4096, 16384) for l0 in (10, 40)]  # fmt: skip
    records[0]["sae_id"] = '<script>alert("x")</script>'
    records[1].update(frac_recovered=None, delta_lm_loss=None)  # evaluated without ablations
    path = tmp_path / "results.json"
    write_results(path, records, {"tokens": 4096})
    return path


def test_report_writes_linked_pngs_and_escapes_names(tmp_path: Path) -> None:
    index = build_report([_results(tmp_path)], tmp_path / "report")
    page = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert len(pngs) == 7  # metrics against L0 per site and width (4), by layer, density per site
    for name in pngs:
        assert (index.parent / name).read_bytes()[:8] == PNG
        assert f'src="{name}"' in page
    assert sorted(re.findall(r'src="([^"]+)"', page)) == pngs  # nothing else is linked
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    assert page.count("<tr>") == 1 + 16
    assert "<th" in page and "—" in page  # the missing ablation shows as a dash


def test_report_replaces_a_report_but_not_other_folders(tmp_path: Path) -> None:
    results = _results(tmp_path)
    out = tmp_path / "report"
    build_report([results], out)
    (out / "stale.png").write_bytes(PNG)
    build_report([results], out)  # a report folder is replaced whole
    assert not (out / "stale.png").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a gemmascope report"):
        build_report([results], tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_report_of_several_models_and_one_sae(tmp_path: Path) -> None:
    write_results(tmp_path / "a.json", [_record(1, "resid_post", 4096, 20)], {})
    write_results(tmp_path / "b.json", [_record(1, "resid_post", 4096, 30, model="other")], {})
    page = build_report([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "r").read_text()
    assert "gemma-3-270m · resid_post" in page and "other · resid_post" in page
    assert ">model<" in page  # the model column is kept when models differ
    assert "Metrics by layer" not in page  # one layer: nothing to draw by layer
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == [
        "density_0_gemma-3-270m_resid_post.png", "density_1_other_resid_post.png",
        "l0_0_gemma-3-270m_resid_post_4k.png", "l0_1_other_resid_post_4k.png",
    ]  # fmt: skip


def test_cli_report(tmp_path: Path) -> None:
    from gemmascope.cli import app

    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["report", str(_results(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing.json"), "--out", str(out)])
    assert bad.exit_code == 2 and "missing.json" in bad.output


def test_width_labels() -> None:
    assert [width_label(w) for w in (4096, 16384, 1 << 20, 24576, 1000)] == [
        "4k", "16k", "1m", "24k", "1000",
    ]  # fmt: skip


def test_l0_figures_read_saebench_metrics_and_draw_a_line_per_layer(tmp_path: Path) -> None:
    from gemmascope.report.figures import METRICS, l0_figures, metric

    core = {"model_performance_preservation": {"ce_loss_score": 0.9},
            "misc_metrics": {"frac_alive": 0.5}}  # fmt: skip
    records = [_record(layer, "resid_post", 4096, l0, saebench={"core": core})
               for layer in range(6) for l0 in (10, 40, 90)]  # fmt: skip
    assert metric(records[0], "ce_loss_score") == 0.9 and metric(records[0], "fvu") == 10**-0.5
    assert metric(records[0], "kl_div_score") is None
    import matplotlib.figure

    drawn: list[Any] = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig: Any, *args: Any, **kw: Any) -> None:
        drawn.append(fig)
        real(fig, *args, **kw)

    matplotlib.figure.Figure.savefig = keep  # type: ignore[method-assign]
    try:
        ((name, caption),) = l0_figures(matplotlib.figure, records, tmp_path, False)
    finally:
        matplotlib.figure.Figure.savefig = real  # type: ignore[method-assign]
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    shown = ("delta_lm_loss", "fvu", "ce_loss_score", "frac_alive")  # those the records have
    assert titles == [t for m, t in METRICS if m in shown]
    assert all(len(ax.get_lines()) == 6 for ax in panels)  # one line per layer
    assert [list(line.get_xdata()) for line in panels[0].get_lines()][0] == [10, 40, 90]
    assert (tmp_path / name).read_bytes()[:8] == PNG and "one line per layer" in caption
