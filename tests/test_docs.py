"""The docs cannot rot: the site builds with warnings as errors, the tutorial notebook runs from top to
bottom, and every example in README.md and docs/*.md runs.

Examples are the fenced blocks of each Markdown file, run in order in one temporary folder per file:
`python` blocks in one namespace, `bash`/`console` blocks with bash (`console`: the `$ ` lines), with
this environment's `gemmascope` first on PATH. Before a block:

- `<!-- not-run: REASON -->` skips it (a block that needs the network, a cluster, hours, or starts a
  server); the reason is required.
- `<!-- file: NAME -->` writes the block to NAME in the folder instead of running it (a sweep file a
  later command reads).

Each folder starts with `demo-out/sae/layer_6_resid_post_w4096_jumprelu_l0_50`, an SAE of the shape
and name `make demo` trains (random weights: the examples need its shape, not its quality).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gemmascope

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
DEMO_SAE = "demo-out/sae/layer_6_resid_post_w4096_jumprelu_l0_50"
RUN = ("python", "bash", "sh", "console")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>not-run|file)\s*:?\s*(?P<arg>.*?)\s*-->$")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    """1-based line of the opening fence."""
    skip: str | None = None
    """Why it is not run, from a `not-run` marker."""
    file: str | None = None
    """Where to write it, from a `file` marker."""


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file with the marker that precedes each, if any."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start = m["fence"], len(m["indent"]), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:])
            i += 1
        i += 1  # the closing fence
        block = Block(m["lang"].lower(), "\n".join(body) + "\n", start + 1)
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = _MARKER.match(lines[prev].strip()) if prev >= 0 else None
        if marker and marker["kind"] == "not-run":
            block.skip = marker["arg"]
        elif marker:
            block.file = marker["arg"]
        out.append(block)
    return out


def markers(path: Path) -> list[tuple[int, str, str]]:
    """Every `not-run`/`file` marker of a file: (line, kind, argument)."""
    return [
        (n, m["kind"], m["arg"])
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if (m := _MARKER.match(line.strip()))
    ]


def example_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


# ---------------------------------------------------------------- the markers themselves (fast)
@pytest.mark.parametrize("path", example_files(), ids=_ids(example_files()))
def test_markers_are_well_formed(path: Path) -> None:
    found = blocks(path)
    marked = {b.line for b in found if b.skip is not None or b.file}
    lines = path.read_text().splitlines()
    for n, kind, arg in markers(path):
        assert arg, (
            f"{path.name}:{n}: a `{kind}` marker needs a reason or a file name after the colon"
        )
        following = next((j for j in range(n, len(lines)) if lines[j].strip()), None)
        assert following is not None and following + 1 in marked, (
            f"{path.name}:{n}: the `{kind}` marker is not followed by a fenced block"
        )
    for b in found:
        if b.lang in RUN or b.skip is not None or b.file:
            continue
        assert b.lang in ("", "text", "yaml", "toml", "json"), (
            f"{path.name}:{b.line}: fenced block in {b.lang!r}, which the examples test cannot run; "
            "use python/bash, or a not-run marker with a reason"
        )


def test_block_parser_reads_markers(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n<!-- not-run: needs the Hub -->\n```bash\ngemmascope x\n```\n\n"
        "<!-- file: s.yaml -->\n```yaml\na: 1\n```\n\n```python\nprint(1)\n```\n"
    )
    got = blocks(md)
    assert [(b.lang, b.skip, b.file) for b in got] == [
        ("bash", "needs the Hub", None),
        ("yaml", None, "s.yaml"),
        ("python", None, None),
    ]
    assert got[2].code == "print(1)\n"


# ---------------------------------------------------------------- running the examples (slow)
@pytest.fixture(scope="session")
def demo_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an SAE shaped and named as `make demo`'s, with random weights."""
    from gemmascope import SAE, SAEConfig

    root = tmp_path_factory.mktemp("demo")
    cfg = SAEConfig(architecture="jumprelu", d_in=640, d_sae=4096, model="gemma-3-270m", layer=6,
                    site="resid_post", dataset="default", context_size=1024)  # fmt: skip
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(4096, 640, generator=g) / 640**0.5)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.threshold.fill_(1.0)
    gemmascope.save(sae, root / DEMO_SAE)
    return root


def _run_shell(block: Block, cwd: Path, where: str) -> None:
    code = block.code
    if block.lang == "console":
        code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(
            f"{where} exited with {done.returncode}:\n{block.code}\n--- stdout\n"
            f"{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("path", example_files(), ids=_ids(example_files()))
def test_examples_run(
    path: Path, demo_sae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(demo_sae / "demo-out", tmp_path / "demo-out")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an example that needs the Hub must say so
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.skip is not None:
            continue
        if block.file:
            (tmp_path / block.file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.file).write_text(block.code)
        elif block.lang == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)  # noqa: S102
            except Exception as e:  # the block and its line in the message, not this test's
                raise AssertionError(f"{where} raised {type(e).__name__}: {e}") from e
        elif block.lang in RUN:
            _run_shell(block, tmp_path, where)


# ---------------------------------------------------------------- the tutorial notebook
def test_tutorial_is_built_from_its_source() -> None:
    done = subprocess.run([sys.executable, str(DOCS / "build_tutorial.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_tutorial_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a fresh machine: no SAE from `make demo`, so the notebook trains its own small one."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # A kernel spec for this interpreter, so the notebook runs in this environment.
    spec = tmp_path / "kernels" / "gemmascope-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "gemmascope tests", "language": "python"})
    )
    monkeypatch.setenv("DEMO_OUT", str(tmp_path / "no-demo-out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GEMMASCOPE_ONLINE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    km = KernelManager(kernel_name="gemmascope-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))  # fmt: skip
    NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the heat-map was not drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "training a small one" in text and "delta_lm_loss" in text
    assert (work / "tutorial-out" / "sae").is_dir()


# ---------------------------------------------------------------- the docs site
def test_docs_build_strict(tmp_path: Path) -> None:
    """`make docs`: MkDocs with mkdocstrings, warnings as errors; the CLI reference is generated."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("cache", "train", "eval", "index", "explore", "report", "publish"):
        assert f'id="gemmascope-{command}"' in cli, f"CLI reference lacks `gemmascope {command}`"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "gemmascope.io.load" in api and "gemmascope.sae.SAE" in api
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "Benchmark results" in bench
