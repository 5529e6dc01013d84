"""Read, replace and resume activations at any site; every hook is removed before the call returns.

Sites of layer L (the same names as in Gemma Scope):
- `resid_pre`: the residual stream entering block L (`output_hidden_states[L]`).
- `resid_post`: the residual stream leaving block L (`output_hidden_states[L + 1]`, except for the last
  layer, whose `output_hidden_states` entry has the final norm applied).
- `attn_out` / `mlp_out`: what attention / the MLP adds to the residual stream, so that
  `resid_post = resid_pre + attn_out + mlp_out`. For Gemma 2/3 these are the outputs of the
  post-attention / post-feedforward norms.
- `attn_z`: the concatenated head outputs entering the attention output projection
  (`o_proj`, GPT-2's `attn.c_proj`), `n_heads * head_dim` wide.
- `mlp_in`: exactly what the MLP reads, the output of the norm in front of it (Gemma's
  `pre_feedforward_layernorm`, Llama's `post_attention_layernorm`, GPT-2's `ln_2`): what a
  transcoder reads to stand in for the MLP (`mlp_in -> mlp_out`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gemmascope.models import SITES, ModelInfo, SiteKey, check_site, model_info

# Order in which a block computes its sites; collect stops right after the last one it needs.
_ORDER = {site: i for i, site in enumerate(SITES)}


class StopForward(Exception):
    """Raised from a hook to end a forward early (the rest is not needed), carrying its `value`."""

    def __init__(self, value: Tensor | None = None) -> None:
        super().__init__()
        self.value = value


def collect(
    model: nn.Module,
    input_ids: Tensor,
    sites: Sequence[SiteKey],
    *,
    attention_mask: Tensor | None = None,
) -> dict[SiteKey, Tensor]:
    """Read activations at several `(layer, site)` pairs in one forward pass.

    The forward stops as soon as the deepest requested value exists, so later blocks, the final norm
    and the unembedding never run. Values are detached views, not copies.

    Args:
        model: a supported Hugging Face causal LM (see `models.model_info`).
        input_ids: `[batch, seq]` token ids.
        sites: `(layer, site)` pairs; duplicates are read once.
        attention_mask: `[batch, seq]`, 1 for real tokens, as the tokenizer returns it.
    Returns:
        `{(layer, site): [batch, seq, width]}` in the order requested.
    """
    info = model_info(model)
    pairs = list(dict.fromkeys((int(layer), site) for layer, site in sites))
    if not pairs:
        raise ValueError(
            "`sites` is empty; pass at least one (layer, site) pair, e.g. [(6, 'resid_post')]"
        )
    for layer, site in pairs:
        check_site(info, layer, site)
    last = max(pairs, key=lambda p: (p[0], _ORDER[p[1]]))
    values: dict[SiteKey, Tensor] = {}

    def recorder(pair: SiteKey) -> Callable[[Tensor], None]:
        def record(value: Tensor) -> None:
            values[pair] = value.detach()
            if pair == last:
                raise StopForward

        return record

    device = next(model.parameters()).device
    handles: list[RemovableHandle] = []
    try:
        for pair in pairs:
            handles.append(_hook(*_site_module(model, info, *pair), recorder(pair)))
        with torch.no_grad():
            model.base_model(
                input_ids=input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                use_cache=False,
            )
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [pair for pair in pairs if pair not in values]
    if missing:
        raise RuntimeError(
            f"the forward pass never reached sites {missing}; is the model's code patched?"
        )
    return {pair: values[pair] for pair in pairs}


@contextlib.contextmanager
def splice(
    model: nn.Module,
    layer: int,
    site: str,
    fn: Callable[[Tensor], Tensor],
    *,
    source: str | None = None,
) -> Iterator[None]:
    """While active, every forward uses `fn(value)` in place of the value at `(layer, site)`.

    Use it to insert an SAE reconstruction (`fn = sae`: calling an SAE reconstructs) or to steer
    (`fn = lambda x: x + alpha * direction`). With `source`, `fn` reads that earlier site of the same
    layer instead: `splice(model, L, "mlp_out", transcoder, source="mlp_in")` replaces the MLP by a
    transcoder. Splices nest; `collect` inside a splice sees the replaced value.

    Args:
        model: a supported Hugging Face causal LM.
        layer, site: where to replace.
        fn: maps `[batch, seq, width of source]` to `[batch, seq, width of site]`; the result is cast
            to the value's dtype.
        source: the site `fn` reads (default: `site` itself); it must come before `site` in the block.
    """
    with rewrite(model, layer, site, lambda src, _: fn(src), source=source):
        yield


@contextlib.contextmanager
def rewrite(
    model: nn.Module,
    layer: int,
    site: str,
    fn: Callable[[Tensor, Tensor], Tensor],
    *,
    source: str | None = None,
) -> Iterator[None]:
    """`splice` whose `fn(source value, value)` also sees the value it replaces (the same tensor
    twice without `source`): an MLP's output edited from its input, say."""
    info = model_info(model)
    check_site(info, layer, site)
    if source is not None:
        check_site(info, layer, source)
        if _ORDER[source] >= _ORDER[site]:
            raise ValueError(
                f"splice at layer {layer} {site}: the source {source!r} is computed after it (or is "
                f"it); a source must come earlier in the block: one of "
                f"{[s for s in _ORDER if _ORDER[s] < _ORDER[site]]}"
            )
    read: dict[str, Tensor] = {}

    def replace(value: Tensor) -> Tensor:
        new = fn(value if source is None else read.pop("value"), value)
        if not isinstance(new, Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(
                f"splice at layer {layer} {site}: `fn` returned {got}, expected a tensor of shape "
                f"{tuple(value.shape)}"
            )
        return new.to(value.dtype)

    def record(value: Tensor) -> None:
        read["value"] = value

    handles = [_hook(*_site_module(model, info, layer, site), replace)]
    try:
        if source is not None:
            handles.append(_hook(*_site_module(model, info, layer, source), record))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_from(
    model: nn.Module, layer: int, hidden: Tensor, *, attention_mask: Tensor | None = None
) -> Tensor:
    """Finish a forward pass from the residual stream entering `layer`, without recomputing blocks 0..layer-1.

    `hidden` is `resid_pre` of `layer` (equivalently `resid_post` of `layer - 1`); `layer == n_layers`
    means the final residual stream, so only the final norm and unembedding run. Positions are
    0..seq-1 as in a plain forward; pass the same `attention_mask` as for the tokens. Splices at
    `layer` or later apply; splices on skipped blocks do not.

    Args:
        model: a supported Hugging Face causal LM.
        layer: 0..n_layers.
        hidden: `[batch, seq, d_model]`, cast to the model's dtype and device.
        attention_mask: `[batch, seq]`, 1 for real tokens.
    Returns:
        Logits `[batch, seq, vocab]`.
    """
    info = model_info(model)
    if not 0 <= layer <= info.n_layers:
        raise ValueError(f"layer {layer} is out of range for run_from; use 0..{info.n_layers}")
    if hidden.ndim != 3 or hidden.shape[-1] != info.d_model:
        raise ValueError(
            f"`hidden` has shape {tuple(hidden.shape)}; expected [batch, seq, {info.d_model}] (d_model)"
        )
    param = next(model.parameters())
    hidden = hidden.to(param.device, param.dtype)
    blocks = decoder_layers(model)
    skipped = [blocks[i] for i in range(layer)]
    handle = None
    try:
        # Blocks before `layer` are swapped for one that just hands `hidden` on: the model's own
        # forward still builds masks (sliding and global) and rotary embeddings exactly as usual.
        for i in range(layer):
            blocks[i] = _Constant(hidden)
        if layer == 0:  # no block to swap: replace the embedding output entering block 0
            handle = _hook(blocks[0], True, lambda _: hidden)
        with torch.no_grad():
            return model(
                inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False
            ).logits
    finally:
        for i, block in enumerate(skipped):
            blocks[i] = block
        if handle is not None:
            handle.remove()


def run_until_head(model: nn.Module, forward: Callable[[], Any]) -> Tensor:
    """Run `forward` up to the output embedding and return what would enter it `[B, T, d_model]`."""

    def stop(_: nn.Module, args: tuple[Any, ...]) -> None:
        raise StopForward(args[0])

    handle = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        forward()
    except StopForward as early:
        return early.value  # type: ignore[return-value]
    finally:
        handle.remove()
    raise RuntimeError(
        "the forward never reached the output embedding; is the model's code patched?"
    )


class _Constant(nn.Module):
    """Stands in for a skipped block: ignores its input and returns the given residual stream."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.value


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, wherever the family keeps it."""
    base = model.base_model
    for path in ("layers", "h", "language_model.layers"):
        found: Any = base
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise RuntimeError(f"found no decoder blocks in {type(model).__name__} (looked for layers, h)")


def _site_module(
    model: nn.Module, info: ModelInfo, layer: int, site: str
) -> tuple[nn.Module, bool]:
    """The module whose input (True) or output (False) is the site's value."""
    block: Any = decoder_layers(model)[layer]
    if site in ("resid_pre", "resid_post"):
        return block, site == "resid_pre"
    if site == "mlp_in":  # every family calls its MLP on the normed residual stream
        return block.mlp, True
    if info.layout == "gemma":
        table = {
            "attn_out": (block.post_attention_layernorm, False),
            "mlp_out": (block.post_feedforward_layernorm, False),
            "attn_z": (block.self_attn.o_proj, True),
        }
    elif info.layout == "llama":  # note: Llama's `post_attention_layernorm` is the pre-MLP norm
        table = {
            "attn_out": (block.self_attn, False),
            "mlp_out": (block.mlp, False),
            "attn_z": (block.self_attn.o_proj, True),
        }
    else:  # gpt2
        table = {
            "attn_out": (block.attn, False),
            "mlp_out": (block.mlp, False),
            "attn_z": (block.attn.c_proj, True),
        }
    return table[site]


def _hook(
    module: nn.Module, on_input: bool, fn: Callable[[Tensor], Tensor | None]
) -> RemovableHandle:
    """Call `fn` on the module's first input or first output; a tensor it returns replaces that value."""
    if on_input:

        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(post)
