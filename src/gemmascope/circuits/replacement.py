"""The local replacement model: one forward of the prompt in which the residual stream is linear in
the transcoders' active latents, the error terms and the token embeddings.

Frozen from the clean run: attention patterns (each head mixes values with the clean run's pattern)
and the scale of every norm (the clean run's `rsqrt`; a LayerNorm's mean stays, being linear): both
are constants of the forward, in value and in gradient. Each MLP's output is replaced by a constant
equal to it (the transcoder's latents decoded, plus the error `mlp_out - transcoder(mlp_in)`) plus
the transcoder's skip `mlp_in @ W_skip`, the one path through an MLP that carries gradient. The
forward's values are the clean model's; only its derivatives change. A cross-layer transcoder is
the same with each layer's latents decoding into that MLP and every later one
(`Dictionary.writes`). Special positions (BOS) carry no latents and no error: what the MLPs write
there is a constant of the prompt, as in circuit-tracer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemmascope.clt import CLT
from gemmascope.hooks import _hook, _site_module, rewrite, run_until_head
from gemmascope.models import model_info
from gemmascope.sae import SAE

_FROZEN = "gemmascope_frozen"


@dataclass
class Dictionary:
    """The MLP transcoders as the replacement model uses them: one per layer, or a cross-layer
    transcoder, folded so that `pre = x @ W_enc[l] + b_enc[l]` reads raw `mlp_in`."""

    encoders: list[SAE]  # per layer: encodes that layer's mlp_in (its decoder unused)
    writes: list[
        list[tuple[int, Tensor]]
    ]  # per layer i: (layer j, W_dec [F, d]) for each j it writes
    b_dec: list[Tensor]  # per layer (d,)
    W_skip: list[Tensor | None]  # per layer (d, d) or None

    @property
    def width(self) -> int:
        return self.encoders[0].cfg.d_sae

    @property
    def skip(self) -> bool:
        return self.W_skip[0] is not None

    def decode(self, acts: list[Tensor]) -> list[Tensor]:
        """What the latents of every layer `[T, F]` write to each layer's MLP output `[T, d]`."""
        out = [b.expand(acts[0].shape[0], -1).clone() for b in self.b_dec]
        for i, z in enumerate(acts):
            for j, w in self.writes[i]:
                out[j] += z @ w
        return out


def prepare(transcoders: Sequence[SAE] | CLT, n_layers: int) -> Dictionary:
    """The `Dictionary` of one MLP transcoder per layer, or of a CLT over all `n_layers` layers."""
    if isinstance(transcoders, CLT):
        return _of_clt(transcoders, n_layers)
    by_layer = {s.cfg.layer: s for s in transcoders}
    bad = [s for s in transcoders if (s.cfg.site, s.cfg.target_site) != ("mlp_in", "mlp_out")]
    if bad:
        raise ValueError(f"{bad[0]!r} is not an MLP transcoder (mlp_in -> mlp_out)")
    if sorted(by_layer) != list(range(n_layers)) or len(transcoders) != n_layers:
        raise ValueError(
            f"the replacement model needs one MLP transcoder for each of the model's {n_layers} "
            f"layers; got layers {sorted(by_layer)}"
        )
    tcs = [
        copy.deepcopy(by_layer[i]).float().eval().fold_input_scale().fold_b_dec_into_b_enc()
        for i in range(n_layers)
    ]
    return Dictionary(tcs, [[(i, tc.W_dec.detach())] for i, tc in enumerate(tcs)],
                      [tc.b_dec.detach() for tc in tcs],
                      [None if tc.W_skip is None else tc.W_skip.detach() for tc in tcs])  # fmt: skip


def _of_clt(clt: CLT, n_layers: int) -> Dictionary:
    c = clt.cfg
    if (c.site, c.target_site) != ("mlp_in", "mlp_out") or list(clt.layers) != list(
        range(n_layers)
    ):
        raise ValueError(
            f"{clt!r} does not stand in for every MLP of this {n_layers}-layer model; the replacement "
            "model needs a CLT from mlp_in to mlp_out over layers 0.."
            f"{n_layers - 1}"
        )
    clt = copy.deepcopy(clt).float().eval()
    encoders = [clt.layer_transcoder(i) for i in range(n_layers)]
    writes = [[(i + k, w.detach()[:, k]) for k in range(n_layers - i)]
              for i, w in enumerate(clt.W_dec)]  # fmt: skip
    skip = [None if clt.W_skip is None else clt.W_skip.detach()[i] for i in range(n_layers)]
    return Dictionary(encoders, writes, list(clt.b_dec.detach()), skip)


@dataclass
class Replacement:
    """The replacement model's forward on one prompt `[T]`, its tensors kept for attribution."""

    ids: Tensor  # (T,) token ids
    embed: Tensor  # (1, T, d) what enters block 0 (Gemma's embedding scale included)
    mlp_in: list[Tensor]  # per layer (1, T, d): what each transcoder reads (targets inject here)
    mlp_out: list[Tensor]  # per layer (1, T, d): what each MLP writes (sources read gradients here)
    final: Tensor  # (1, T, d) the final norm's output, which the unembedding reads
    acts: list[Tensor]  # per layer (T, F): the transcoders' latents, zero at special positions
    errors: list[Tensor]  # per layer (T, d): mlp_out - transcoder output, zero at special positions
    dictionary: Dictionary


def run(
    model: nn.Module,
    ids: Tensor,
    dictionary: Dictionary,
    special: Tensor,
    shift: dict[tuple[int, int], Tensor] | None = None,
) -> Replacement:
    """The replacement model's forward on `ids [T]`; `special [T]` marks positions without latents.

    `shift` adds a vector to what the MLP of `(layer, position)` writes, everything else frozen as it
    was (latents, errors, patterns, norm scales): a latent moved by `eps` is `eps * W_dec[latent]`.
    """
    info = model_info(model)
    clean_in: dict[int, Tensor] = {}
    clean_out: dict[int, Tensor] = {}
    frozen: dict[int, Tensor] = {}  # norm scales and attention patterns of the clean run
    with torch.no_grad(), _frozen(model, frozen), _recording(model, info, clean_in, clean_out):
        run_until_head(model, lambda: model(input_ids=ids[None], use_cache=False))
    keep = (~special).float()[:, None]  # (T, 1)
    d = dictionary
    with torch.no_grad():
        xs = [clean_in[layer][0].float() for layer in range(info.n_layers)]  # (T, d) each
        acts = [enc.encode(x) * keep for enc, x in zip(d.encoders, xs, strict=True)]  # (T, F)
        decoded = d.decode(acts)
        errors, consts = [], []
        for layer, x in enumerate(xs):
            y = clean_out[layer][0].float()
            skip = x @ d.W_skip[layer] if d.skip else torch.zeros_like(x)
            errors.append((y - decoded[layer] - skip) * keep)
            const = y - skip  # what the MLP writes, less the part linear in mlp_in
            for (at, pos), vec in (shift or {}).items():
                if at == layer:
                    const[pos] += vec.float()
            consts.append(const)
    out: dict[str, list[Tensor]] = {"mlp_in": [], "mlp_out": []}
    embed: list[Tensor] = []
    with _frozen(model, frozen), contextlib.ExitStack() as stack:
        embedding = model.get_input_embeddings()

        def leaf(_: nn.Module, __: tuple, value: Tensor) -> Tensor:
            embed.append(value.detach().float().requires_grad_())
            return embed[-1].to(value.dtype)

        stack.callback(embedding.register_forward_hook(leaf).remove)
        for layer in range(info.n_layers):
            stack.enter_context(_replaced_mlp(model, layer, d.W_skip[layer], consts[layer], out))
        with torch.enable_grad():
            final = run_until_head(model, lambda: model(input_ids=ids[None], use_cache=False))
    return Replacement(ids, embed[0], out["mlp_in"], out["mlp_out"], final.float(), acts, errors,
                       dictionary)  # fmt: skip


@contextlib.contextmanager
def _recording(
    model: nn.Module, info, ins: dict[int, Tensor], outs: dict[int, Tensor]
) -> Iterator[None]:
    def recorder(store: dict[int, Tensor], layer: int):
        return lambda value: store.__setitem__(layer, value)

    handles = [
        _hook(*_site_module(model, info, layer, site), recorder(store, layer))
        for layer in range(info.n_layers)
        for site, store in (("mlp_in", ins), ("mlp_out", outs))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replaced_mlp(
    model: nn.Module, layer: int, W_skip: Tensor | None, const: Tensor, out: dict[str, list[Tensor]]
) -> contextlib.AbstractContextManager[None]:
    """While active, layer `layer`'s MLP writes `const + mlp_in @ W_skip` (its clean value)."""

    def write(x_in: Tensor, _: Tensor) -> Tensor:
        out["mlp_in"].append(x_in)
        if W_skip is not None:
            new = (const + x_in[0].float() @ W_skip)[None]  # (1, T, d), linear in mlp_in
        else:  # a constant, made a leaf so that gradients can be read at it
            new = const[None].clone().requires_grad_(True)
        out["mlp_out"].append(new)
        return new

    return rewrite(model, layer, "mlp_out", write, source="mlp_in")


@contextlib.contextmanager
def _frozen(model: nn.Module, cache: dict[int, Tensor]) -> Iterator[None]:
    """Attention patterns and norm scales are constants: taken from `cache` (by module) when there,
    else computed from the detached input and stored there; everything else unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                  **kwargs: object) -> tuple[Tensor, None]:  # fmt: skip
        if id(module) not in cache:
            cache[id(module)] = _pattern(module, query, key, mask, **kwargs)
        groups = query.shape[1] // value.shape[1]
        w = cache[id(module)].to(query.dtype)  # (B, H, T, T)
        return (w @ value.repeat_interleave(groups, dim=1)).transpose(1, 2).contiguous(), None

    def norm(module: nn.Module, args: tuple, _: Tensor) -> Tensor:
        x = args[0]
        if id(module) not in cache:
            cache[id(module)] = _scale(module, x.detach())
        return _scaled(module, x, cache[id(module)], gemma)

    AttentionInterface.register(_FROZEN, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_FROZEN, eager_mask)
    gemma = model_info(model).layout == "gemma"
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    before = {key: c._attn_implementation_internal for key, c in configs.items()}
    handles = [
        m.register_forward_hook(norm)
        for m in model.base_model.modules()
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    ]
    try:
        for c in configs.values():
            c._attn_implementation_internal = _FROZEN
        yield
    finally:
        for h in handles:
            h.remove()
        for key, c in configs.items():
            c._attn_implementation_internal = before[key]


def _scale(module: nn.Module, x: Tensor) -> Tensor:
    """The per-token factor a norm divides by, `[..., 1]`, in float32."""
    h = x.float()
    if isinstance(module, nn.LayerNorm):
        return torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + module.eps)
    eps = getattr(module, "eps", None) or module.variance_epsilon
    return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _scaled(module: nn.Module, x: Tensor, scale: Tensor, gemma: bool) -> Tensor:
    """The norm's output with `scale` as its factor: linear in `x` (a LayerNorm's mean is linear)."""
    h = x.float()
    if isinstance(module, nn.LayerNorm):
        return ((h - h.mean(-1, keepdim=True)) * scale * module.weight + module.bias).to(x.dtype)
    weight = (1.0 + module.weight.float()) if gemma else module.weight.float()
    return (h * scale * weight).to(x.dtype)


def _pattern(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    **_: object,
) -> Tensor:
    """The attention pattern `[B, H, T, T]` as eager attention computes it, detached."""
    query, key = query.detach(), key.detach()
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    w = query @ key.transpose(2, 3) * scaling  # (B, H, T, T)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w + mask[:, :, :, : key.shape[-2]]
    return torch.softmax(w.float(), dim=-1)
