"""Virtual environments of their own for the tools whose pins clash with ours (dictionary-learning,
circuit-tracer): built once into a cache folder, with our torch installed first so that it stays
ours, and checked by importing the tool. Building needs PyPI: without it the build fails, it never
skips."""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TORCH = torch.__version__.split("+")[0]
ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmascope-test-envs"


def tool_python(name: str, installs: list[list[str]], probe: str) -> Path:
    """The python of the venv `name` (built unless cached): `installs` are pip argument lists run in
    order after our torch; `probe` is code that imports the tool."""
    env = ROOT / f"{name}-torch-{TORCH}"
    python = env / "bin" / "python"
    ROOT.mkdir(parents=True, exist_ok=True)
    check = f"{probe}\nimport torch; print(torch.__version__)"
    with open(ROOT / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across pytest runs
        found = _torch_in(python, check)
        if found != torch.__version__:
            shutil.rmtree(env, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", env], check=True)
            pip = [python, "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, f"torch=={TORCH}"], check=True)  # first: a plain torch is CUDA
            for args in installs:
                subprocess.run([*pip, *args], check=True)
            found = _torch_in(python, check)
    assert found == torch.__version__, f"{env}: torch {found}, not ours"
    return python


def _torch_in(python: Path, check: str) -> str | None:
    if not python.exists():
        return None
    run = subprocess.run([python, "-c", check], capture_output=True, text=True)
    return (
        run.stdout.strip().splitlines()[-1] if run.returncode == 0 and run.stdout.strip() else None
    )


def circuit_tracer_python() -> Path:
    """The python of a venv with circuit-tracer 0.5.0 and the nnsight 0.6.3 its backend needs."""
    return tool_python(
        "circuit-tracer-0.5.0",
        [["circuit-tracer==0.5.0"], [f"torch=={TORCH}", "nnsight==0.6.3"]],
        "import circuit_tracer.transcoder.single_layer_transcoder",
    )


def for_transformers_4(folder: Path) -> None:
    """Restate what transformers 4.57 reads from a folder transformers 5 saved: Gemma 3's two rope
    bases under their old names, and a tokenizer class it knows."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rope.get("full_attention", {}).get("rope_theta", 10000.0)
    cfg["rope_local_base_freq"] = rope.get("sliding_attention", {}).get("rope_theta", 10000.0)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


def saebench_path() -> Path:
    """A folder to put on `sys.path` holding sae-bench 0.6.0 without its dependencies: its core eval
    and result classes need only sae-lens, transformer-lens and pydantic, which our test extras
    bring (its own pins would replace our torch)."""
    target = ROOT / "sae-bench-0.6.0-nodeps"
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "sae_bench" / "evals" / "core" / "main.py").exists():
            shutil.rmtree(target, ignore_errors=True)
            pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
            subprocess.run([*pip, target, "sae-bench==0.6.0", "tabulate==0.9.0"], check=True)
    return target


def saebench_module(name: str) -> Any:
    """A module of sae-bench 0.6.0 (`saebench_path`), imported without leaving it on `sys.path`."""
    sys.path.insert(0, str(saebench_path()))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
