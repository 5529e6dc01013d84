"""The sparse autoencoder: one module, four activation rules, weights named as Gemma Scope names them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gemmascope.common.config import check, option

Architecture = Literal["jumprelu", "topk", "batchtopk", "relu"]
ARCHITECTURES: tuple[str, ...] = ("jumprelu", "topk", "batchtopk", "relu")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_of(name: str) -> torch.dtype:
    """Map a dtype name (`float32`, `bfloat16`, ...) to torch, with a clear error."""
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and to know where it belongs."""

    architecture: Architecture
    """Activation rule: `jumprelu` (Gemma Scope), `topk`, `batchtopk` or `relu` (trained with L1)."""
    d_in: int = option(ge=1)
    """Width of the activations the SAE reads (d_model for residual sites)."""
    d_sae: int = option(ge=1)
    """Number of latents."""
    k: int | None = option(None, ge=1)
    """Active latents per token for `topk` and `batchtopk` (mean over the batch for the latter)."""
    dtype: str = "float32"
    """Dtype of the weights; inputs are cast to it."""
    apply_b_dec_to_input: bool = False
    """Subtract `b_dec` from the input before encoding. Gemma Scope does not; SAELens and sparsify may."""
    input_scale: float = option(1.0, gt=0)
    """Activations are divided by this before encoding and the reconstruction multiplied by it again.
    1.0 once a training-time normalisation has been folded into the weights."""
    model: str | None = None
    """The model the SAE was trained on, e.g. `google/gemma-2-2b` or `gemma-3-270m`."""
    layer: int | None = option(None, ge=0)
    """Layer index of the site."""
    site: str | None = None
    """Site within the layer the SAE reads: `resid_pre`, `resid_post`, `mlp_in`, `mlp_out`,
    `attn_out`, `attn_z`."""
    target_site: str | None = None
    """Transcoders: the site of the same layer the SAE writes (`mlp_out` for one that reads `mlp_in`
    and stands in for the MLP). None: it reconstructs what it reads."""
    skip_connection: bool = False
    """Add a learned linear skip `x @ W_skip` to the output (Gemma Scope 2's affine skip
    transcoders, sparsify's `skip_connection`)."""
    n_layers: int | None = option(None, ge=1)
    """Cross-layer transcoders (`clt.CLT`): the consecutive layers from `layer` on whose `site` it
    reads and whose `target_site` it writes, `d_sae` latents each. None: one layer (an `SAE`)."""
    hook_name: str | None = None
    """The site's name in another tool (e.g. SAELens' `blocks.6.hook_resid_post`), kept for round trips."""
    dataset: str | None = None
    """Provenance: the corpus the SAE was trained on."""
    context_size: int | None = None
    """Provenance: the training sequence length in tokens."""
    tokens_trained: int | None = None
    """Provenance: how many activation vectors the SAE saw."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried along (training hyper-parameters, source format, ...)."""

    def __post_init__(self) -> None:
        check(self)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown `architecture` {self.architecture!r}; choose one of {list(ARCHITECTURES)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(
                f"`d_in` and `d_sae` must be positive, got {self.d_in} and {self.d_sae}"
            )
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(
                    f"`k` must be in 1..d_sae={self.d_sae} for {self.architecture}, got {self.k}"
                )
        dtype_of(self.dtype)
        if self.skip_connection and self.target_site is None:
            raise ValueError(
                "`skip_connection` is for transcoders: an SAE that reconstructs its own input with "
                "a skip would learn the identity; set `target_site` or drop the skip"
            )
        if not self.input_scale > 0:
            raise ValueError(f"`input_scale` must be positive, got {self.input_scale}")
        if self.n_layers is not None and (
            self.target_site is None or self.layer is None or self.apply_b_dec_to_input
            or self.input_scale != 1.0
        ):  # fmt: skip
            raise ValueError(
                "a cross-layer transcoder (`n_layers`) needs `layer` (its first) and `target_site`, "
                "and reads raw activations (no `apply_b_dec_to_input`, `input_scale` 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if "target_site" not in d and (d.get("extra") or {}).get("target_site"):
            d = {**d, "target_site": d["extra"]["target_site"]}  # saved before it was a field
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown SAEConfig fields {unknown}; expected some of {sorted(known)}"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def activate(pre: Tensor, cfg: SAEConfig, threshold: Tensor, training: bool = False) -> Tensor:
    """The sparsifying rule of `cfg.architecture` on pre-activations `[..., d_sae]`."""
    arch = cfg.architecture
    if arch == "jumprelu" or (arch == "batchtopk" and not training):
        return pre * (pre > threshold)
    if arch == "relu":
        return torch.relu(pre)
    if arch == "topk":
        vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    if arch == "batchtopk":
        flat = pre.reshape(-1)
        n_tokens = flat.numel() // cfg.d_sae
        vals, idx = torch.relu(flat).topk(cfg.k * n_tokens, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape)
    raise AssertionError(arch)


def _count_nonfinite(t: Tensor, block: int = 1 << 22) -> int:
    """How many entries of `t` are NaN or infinite (0 if it is not floating point), checked about
    `block` entries at a time so that no full-size temporary is made."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    rows = t.T if t.dim() == 2 and not t.is_contiguous() else t  # walk memory in order
    rows = rows.reshape(1, -1) if rows.dim() < 2 else rows
    step = max(1, block // max(1, rows[0].numel()))
    bad = 0
    for a in range(0, rows.shape[0], step):
        part = rows[a : a + step]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad


class SAE(nn.Module):
    """A sparse autoencoder `x -> z -> x_hat` with Gemma Scope's parameter names and shapes.

    `pre = x @ W_enc + b_enc` (after `x - b_dec` when `apply_b_dec_to_input`), then:
    - jumprelu: `z = pre * 1[pre > threshold]`
    - relu: `z = relu(pre)`
    - topk: the `k` largest entries of `pre` per token, through relu
    - batchtopk: while training, the `k * n_tokens` largest entries over the whole batch; in eval mode
      a JumpReLU with the per-latent `threshold` the trainer estimated, so encodings do not depend on
      which other tokens share the batch.
    `x_hat = z @ W_dec + b_dec`, plus `x @ W_skip` for a skip transcoder. Any leading batch shape
    works; dtype and device follow the weights.
    """

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.n_layers is not None:
            raise ValueError(
                f"this config is a cross-layer transcoder over {cfg.n_layers} layers; build it "
                "with `gemmascope.clt.CLT` (`io.load` does)"
            )
        self.cfg = cfg
        dt = dtype_of(cfg.dtype)
        d, m = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d, m, dtype=dt, device=device))
        self.W_dec = nn.Parameter(torch.zeros(m, d, dtype=dt, device=device))
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dt, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dt, device=device))
        self.threshold = nn.Parameter(torch.zeros(m, dtype=dt, device=device))
        self.W_skip = (
            nn.Parameter(torch.zeros(d, d, dtype=dt, device=device))
            if cfg.skip_connection
            else None
        )

    # ---------------------------------------------------------------- forward pass
    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def _check_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            where = f" (layer {self.cfg.layer}, site {self.cfg.site})" if self.cfg.site else ""
            raise ValueError(
                f"input has width {x.shape[-1]} in its last dimension but this SAE{where} expects "
                f"d_in={self.cfg.d_in}; pass activations from the site the SAE was trained on"
            )
        return x.to(dtype=self.dtype, device=self.device)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[..., d_sae]` for raw activations `[..., d_in]`."""
        x = self._check_input(x)
        if self.cfg.input_scale != 1.0:
            x = x / self.cfg.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the architecture's sparsifying rule to pre-activations."""
        return activate(pre, self.cfg, self.threshold, self.training)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations `[..., d_sae]` for raw activations `[..., d_in]`."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction `[..., d_in]` in the scale of the raw activations."""
        x_hat = z.to(self.dtype) @ self.W_dec + self.b_dec
        if self.cfg.input_scale != 1.0:
            x_hat = x_hat * self.cfg.input_scale
        return x_hat

    def skip(self, x: Tensor) -> Tensor:
        """The skip connection's part of the output, `x @ W_skip` (zero without one)."""
        if self.W_skip is None:
            return torch.zeros_like(self._check_input(x))
        return self._check_input(x) @ self.W_skip

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of the input, or a transcoder's prediction of its target site."""
        out = self.decode(self.encode(x))
        return out if self.W_skip is None else out + self.skip(x)

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def fold_input_scale(self) -> SAE:
        """Fold `input_scale` into the weights so the SAE reads raw activations with scale 1.

        `pre = (x/C) W_enc + b_enc` becomes `x (W_enc/C) + b_enc`; `x_hat = C (z W_dec + b_dec)` becomes
        `z (C W_dec) + C b_dec`. Encodings are unchanged; decoder rows are no longer unit norm.
        """
        c = self.cfg.input_scale
        if c != 1.0:
            self.W_enc.div_(c)
            self.W_dec.mul_(c)
            self.b_dec.mul_(c)
            self.cfg = dataclasses.replace(self.cfg, input_scale=1.0)
        return self

    @torch.no_grad()
    def fold_b_dec_into_b_enc(self) -> SAE:
        """Turn an SAE that subtracts `b_dec` from its input into Gemma Scope's form, encodings unchanged."""
        if self.cfg.apply_b_dec_to_input:
            self.b_enc.sub_((self.b_dec / self.cfg.input_scale) @ self.W_enc)
            self.cfg = dataclasses.replace(self.cfg, apply_b_dec_to_input=False)
        return self

    def state_arrays(self) -> dict[str, Tensor]:
        """The weight tensors by their Gemma Scope names (five, and `W_skip` for a skip transcoder)."""
        names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
        arrays = {n: getattr(self, n).detach() for n in names}
        if self.W_skip is not None:
            arrays["W_skip"] = self.W_skip.detach()
        return arrays

    def sha256(self) -> str:
        """A digest of the weights (float32 bytes by name): which SAE a feature index was built of."""
        import hashlib

        h = hashlib.sha256()
        for name, t in self.state_arrays().items():
            h.update(name.encode())
            h.update(t.float().cpu().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_arrays(
        cls, cfg: SAEConfig, arrays: dict[str, Any], *, source: str = "arrays",
        allow_nonfinite: bool = False, adopt: bool = False,
    ) -> SAE:  # fmt: skip
        """Build an SAE from arrays named as Gemma Scope names them; `threshold` may be absent.

        Raises a ValueError naming `source` and the array when one is missing or misshapen, or holds
        a NaN or an infinity (unless `allow_nonfinite`: such an SAE encodes to NaN, but may be
        worth opening to see what went wrong).

        With `adopt`, a tensor already of the SAE's dtype, on its device, and either contiguous or
        (2-D) the transpose of a contiguous array becomes the parameter itself, without a copy
        (others are copied): the SAE then shares its memory, so the caller must not change it.
        """
        sae = cls(cfg, device="meta")  # no memory: every parameter is set below
        dt, device = dtype_of(cfg.dtype), torch.empty(0).device
        d, m = cfg.d_in, cfg.d_sae
        expected = {
            "W_enc": (d, m),
            "W_dec": (m, d),
            "b_enc": (m,),
            "b_dec": (d,),
            "threshold": (m,),
            **({"W_skip": (d, d)} if cfg.skip_connection else {}),
        }
        if "W_skip" in arrays and not cfg.skip_connection:
            raise ValueError(
                f"{source}: holds a skip connection 'W_skip' but its config has no "
                "`skip_connection`; without it the outputs would change"
            )
        for name, shape in expected.items():
            if name not in arrays:
                if name == "threshold" and cfg.architecture != "jumprelu":
                    setattr(sae, name, nn.Parameter(torch.zeros(shape, dtype=dt, device=device)))
                    continue
                raise ValueError(
                    f"{source}: missing array {name!r}; expected {sorted(expected)} "
                    f"(found {sorted(arrays)})"
                )
            t = torch.as_tensor(arrays[name])
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{source}: array {name!r} has shape {tuple(t.shape)}, expected {shape} "
                    f"for d_in={d}, d_sae={m}"
                )
            bad = 0 if allow_nonfinite else _count_nonfinite(t)
            if bad:
                raise ValueError(
                    f"{source}: array {name!r} holds {bad} non-finite value(s) (NaN or inf), so the "
                    "SAE would compute NaNs; it was saved broken. To open it anyway, "
                    "load(..., allow_nonfinite=True)"
                )
            with torch.no_grad():
                t = t.detach()
                whole = t.is_contiguous() or (t.dim() == 2 and t.T.is_contiguous())
                if not (adopt and whole and t.dtype == dt and t.device == device):
                    t = torch.empty(shape, dtype=dt, device=device).copy_(t)
                setattr(sae, name, nn.Parameter(t))
        return sae

    def __repr__(self) -> str:
        c = self.cfg
        where = f", model={c.model!r}, layer={c.layer}, site={c.site!r}" if c.site else ""
        if c.target_site:
            where += f", target_site={c.target_site!r}" + (", skip" if c.skip_connection else "")
        k = f", k={c.k}" if c.k else ""
        return f"SAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, dtype={c.dtype}{where})"
