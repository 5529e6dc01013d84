"""Running per-latent statistics over a stream of SAE activations, merged one chunk at a time.

Everything is kept per latent in fixed-size tensors, so memory does not grow with the corpus and the
state can be checkpointed and resumed exactly:

- the `top_k` largest activations, each with a window of `2 * window + 1` tokens and activations
  around it (the window is cut at the sequence's edges; missing places hold token -1);
- a sample of lower activations: the activations of a latent are split into octave *bands* below
  `hi`, the smallest power of two above its running maximum (band 0 is `[hi/2, hi)`, band j is
  `[hi/2^(j+1), hi/2^j)`, the last band holds everything below). Each band keeps the `samples`
  entries with the smallest random keys, i.e. a uniform sample without replacement of the band. When
  the maximum grows, `hi` doubles and every stored entry is simply re-banded by its value;
- a histogram of the non-zero activations in `bins` equal bins over `[0, hi)`; when `hi` doubles,
  neighbouring bins are merged in pairs, so no activation is ever re-binned from memory;
- how many tokens each latent fired on, and how many tokens were counted.

Each chunk is merged with a few sorts over the chunk's non-zero activations, never a loop over latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gemmascope.corpus.tokens import token_bytes

STATE_KEYS = (
    "top_val", "top_loc", "top_tok", "top_act",
    "band_key", "band_val", "band_loc", "band_tok", "band_act",
    "hi", "hist", "fired", "n_tokens",
)  # fmt: skip


class FeatureStats:
    """Top-k contexts, band samples, histogram and firing counts for `d_sae` latents.

    Args:
        d_sae: number of latents.
        top_k: contexts kept per latent at the top.
        window: tokens kept on each side of an activation.
        bands: octave bands below `hi` that are sampled.
        samples: contexts kept per band.
        bins: histogram bins over `[0, hi)`; a power of two.
        seed: seeds the sampling keys (chunk `i` uses `seed` and `i`, so a resumed run draws alike).
        device: where the state lives (the SAE's device).
    """

    def __init__(
        self,
        d_sae: int,
        *,
        top_k: int = 20,
        window: int = 16,
        bands: int = 4,
        samples: int = 3,
        bins: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"`bins` must be a power of two >= 2, got {bins}")
        for name, value in (("top_k", top_k), ("bands", bands), ("samples", samples)):
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1, got {value}")
        if window < 0:
            raise ValueError(f"`window` must be >= 0, got {window}")
        self.d_sae, self.top_k, self.window = d_sae, top_k, window
        self.bands, self.samples, self.bins, self.seed = bands, samples, bins, seed
        m, k, w, s = d_sae, top_k, 2 * window + 1, bands * samples
        dev = torch.device(device)
        f32 = dict(dtype=torch.float32, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        self.top_val = torch.zeros(m * k, **f32)  # (m*k,) 0 = empty slot; slot l*k + rank
        self.top_loc = torch.full((m * k,), -1, **i64)  # stream position: sequence * T + t
        self.top_tok = torch.full((m * k, w), -1, **i32)
        self.top_act = torch.zeros(m * k, w, **f32)
        self.band_key = torch.full((m * s,), math.inf, **f32)  # slot (l*bands + j)*samples + r
        self.band_val = torch.zeros(m * s, **f32)
        self.band_loc = torch.full((m * s,), -1, **i64)
        self.band_tok = torch.full((m * s, w), -1, **i32)
        self.band_act = torch.zeros(m * s, w, **f32)
        self.hi = torch.zeros(m, **f32)  # 0 until the latent first fires
        self.hist = torch.zeros(m, bins, **i64)
        self.fired = torch.zeros(m, **i64)
        self.n_tokens = torch.zeros((), **i64)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor]:
        """The tensors that make up the state (for a checkpoint)."""
        return {name: getattr(self, name) for name in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a `state_dict`; shapes must match this instance's settings."""
        for name in STATE_KEYS:
            ours = getattr(self, name)
            if name not in state or state[name].shape != ours.shape:
                got = tuple(state[name].shape) if name in state else "missing"
                raise ValueError(
                    f"checkpoint tensor {name!r} is {got}, expected {tuple(ours.shape)}; it was "
                    "written with other index settings"
                )
            setattr(self, name, state[name].to(ours.device, ours.dtype).clone())

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(
        self, z: Tensor, tokens: Tensor, counted: Tensor, first_sequence: int, chunk: int
    ) -> None:
        """Merge one chunk of activations.

        Args:
            z: `[B, T, d_sae]` latent activations; zeroed in place where `counted` is False, so the
                stored windows show 0 there too.
            tokens: `[B, T]` token ids of those positions.
            counted: `[B, T]` bool, False at positions that never count (BOS, EOS, padding).
            first_sequence: global index of the chunk's first sequence (for stream positions).
            chunk: index of the chunk (seeds the sampling keys).
        """
        B, T, m = z.shape
        z[~counted] = 0
        self.n_tokens += int(counted.sum())
        flat = z.reshape(B * T, m)  # (N, m)
        rows, lat = (flat > 0).nonzero(as_tuple=True)  # (n,) each
        val = flat[rows, lat]  # (n,)
        loc = (first_sequence + rows // T) * T + rows % T  # (n,) stream positions
        self.fired += torch.bincount(lat, minlength=m)
        grown = self._grow(lat, val)
        self._histogram(lat, val)
        self._merge_top(z, tokens, rows, lat, val, loc)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + chunk)
        key = torch.rand(len(val), generator=gen).to(z.device)  # (n,)
        self._merge_bands(z, tokens, rows, lat, val, loc, key, grown)

    def _grow(self, lat: Tensor, val: Tensor) -> Tensor:
        """Raise `hi` to the power of two above each new maximum; merge histogram bins to match."""
        m = self.d_sae
        cmax = torch.zeros(m, device=val.device).scatter_reduce_(0, lat, val, "amax")  # (m,)
        _, exp = torch.frexp(cmax)  # cmax = mantissa * 2**exp, mantissa in [0.5, 1)
        new_hi = torch.where(cmax > 0, torch.ldexp(torch.ones_like(cmax), exp), 0.0)  # (m,)
        grown = new_hi > self.hi
        if grown.any():
            _, old_exp = torch.frexp(self.hi)
            steps = torch.where(self.hi > 0, exp - old_exp + 1, 0)  # hi = 2**(old_exp - 1)
            steps = torch.where(grown, steps, 0)
            for step in range(min(int(steps.max()), int(math.log2(self.bins)))):
                sel = steps > step
                h = self.hist[sel]  # (s, bins)
                merged = h.view(-1, self.bins // 2, 2).sum(-1)
                self.hist[sel] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.hi = torch.where(grown, new_hi, self.hi)
        return grown

    def _histogram(self, lat: Tensor, val: Tensor) -> None:
        b = (val / self.hi[lat] * self.bins).long().clamp_(max=self.bins - 1)  # (n,)
        counts = torch.bincount(lat * self.bins + b, minlength=self.d_sae * self.bins)
        self.hist += counts.view(self.d_sae, self.bins)

    def band_of(self, val: Tensor, lat: Tensor) -> Tensor:
        """Band index of activations `val` of latents `lat` (0 = the top octave below `hi`)."""
        _, exp = torch.frexp(val / self.hi[lat])  # ratio in [2**(exp-1), 2**exp), exp <= 0
        return (-exp).clamp_(max=self.bands - 1)

    def _merge_top(
        self, z: Tensor, tokens: Tensor, rows: Tensor, lat: Tensor, val: Tensor, loc: Tensor
    ) -> None:
        k = self.top_k
        kth = self.top_val.view(-1, k)[:, -1]  # (m,) 0 while the latent has free slots
        new = val > kth[lat]
        rows, lat, val, loc = _select(new, rows, lat, val, loc)
        touched = self._touched(lat)
        occupied = (self.top_val.view(-1, k) > 0) & touched[:, None]  # (m, k)
        old = occupied.view(-1).nonzero().squeeze(1)  # (o,) slots of the latents that change
        group = torch.cat([old // k, lat])
        rank = _rank_within(group, torch.cat([self.top_val[old], val]), descending=True)
        keep = rank < k
        kept = keep[len(old) :]
        windows = self._windows(z, tokens, rows[kept], lat[kept])
        _place((self.top_val, self.top_loc, self.top_tok, self.top_act), touched, k,
               old, group * k + rank, keep, (val[kept], loc[kept], *windows),
               empty=(0.0, -1, -1, 0.0))  # fmt: skip

    def _merge_bands(
        self,
        z: Tensor,
        tokens: Tensor,
        rows: Tensor,
        lat: Tensor,
        val: Tensor,
        loc: Tensor,
        key: Tensor,
        grown: Tensor,
    ) -> None:
        nb, s = self.bands, self.samples
        # Cheap first cut: a key above every band's last kept key cannot enter (inf: room left).
        cap = self.band_key.view(-1, nb, s)[:, :, -1].amax(dim=1)  # (m,)
        maybe = (key < cap[lat]) | grown[lat]  # a latent whose hi grew is re-banded from scratch
        rows, lat, val, loc, key = _select(maybe, rows, lat, val, loc, key)
        band = self.band_of(val, lat)
        last_key = self.band_key.view(-1, nb, s)[lat, band, -1]  # (n,) inf while the band has room
        new = (key < last_key) | grown[lat]
        rows, lat, val, loc, key, band = _select(new, rows, lat, val, loc, key, band)
        touched = self._touched(lat)
        occupied = torch.isfinite(self.band_key.view(-1, nb * s)) & touched[:, None]
        old = occupied.view(-1).nonzero().squeeze(1)  # (o,)
        old_lat = old // (nb * s)
        old_band = self.band_of(self.band_val[old], old_lat)
        group = torch.cat([old_lat * nb + old_band, lat * nb + band])
        rank = _rank_within(group, torch.cat([self.band_key[old], key]))
        keep = rank < s
        kept = keep[len(old) :]
        windows = self._windows(z, tokens, rows[kept], lat[kept])
        _place((self.band_key, self.band_val, self.band_loc, self.band_tok, self.band_act),
               touched, nb * s, old, group * s + rank, keep,
               (key[kept], val[kept], loc[kept], *windows), empty=(math.inf, 0.0, -1, -1, 0.0))  # fmt: skip

    def _touched(self, lat: Tensor) -> Tensor:
        """`[d_sae]` bool: the latents with candidates this chunk; only their slots are rewritten."""
        touched = torch.zeros(self.d_sae, dtype=torch.bool, device=lat.device)
        touched[lat] = True
        return touched

    def _windows(
        self, z: Tensor, tokens: Tensor, rows: Tensor, lat: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Tokens `[n, W]` (int32, -1 off the sequence) and activations `[n, W]` around each entry."""
        B, T, _ = z.shape
        offsets = torch.arange(-self.window, self.window + 1, device=z.device)  # (W,)
        b, t = (rows // T)[:, None], (rows % T)[:, None] + offsets  # (n, 1), (n, W)
        inside = (t >= 0) & (t < T)
        t = t.clamp(0, T - 1)
        acts = z[b, t, lat[:, None]] * inside  # (n, W)
        toks = torch.where(inside, tokens[b, t].to(torch.int32), -1)  # (n, W)
        return toks, acts.float()


def _select(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The entries where `mask` holds, of each tensor (one `nonzero` for all, not one each)."""
    idx = mask.nonzero().squeeze(1)
    return tuple(t.index_select(0, idx) for t in tensors)


def _rank_within(group: Tensor, score: Tensor, *, descending: bool = False) -> Tensor:
    """Rank of each entry among the entries of its group by `score` (ties: input order).

    `score` holds non-negative float32 values, whose bit patterns order like the values, so one
    stable sort of `group * 2**32 + bits` ranks every group at once, exactly.
    """
    bits = score.to(torch.float32).contiguous().view(torch.int32).long()  # (n,) in [0, 2**31)
    if descending:
        bits = (2**31 - 1) - bits
    order = torch.argsort(group * 2**32 + bits, stable=True)
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group)  # index of each group's first entry
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=group.device) - first
    return rank


def _place(
    arrays: tuple[Tensor, ...],
    touched: Tensor,
    per_latent: int,
    old: Tensor,
    dest: Tensor,
    keep: Tensor,
    new: tuple[Tensor, ...],
    empty: tuple[float | int, ...],
) -> None:
    """Rewrite, in place, the slots of the touched latents: their kept old entries (the first
    `len(old)` of `dest`) move to their new slots, the kept new entries (`new`, already restricted to
    those kept) land in theirs, and the remaining slots are emptied. Other latents are not touched, so
    a chunk that changes few latents costs little."""
    n_old = len(old)
    keep_old, keep_new = keep[:n_old], keep[n_old:]
    dest_old, dest_new = dest[:n_old][keep_old], dest[n_old:][keep_new]
    src_old = old[keep_old]
    cleared = touched.repeat_interleave(per_latent).nonzero().squeeze(1)
    for array, fresh, fill in zip(arrays, new, empty, strict=True):
        moved = array[src_old]  # a copy, taken before the slots are cleared
        array[cleared] = fill
        array[dest_old] = moved
        array[dest_new] = fresh.to(array.dtype)


def token_decoder(tokenizer: Any) -> Callable[[list[int]], list[bytes]]:
    """Each id's exact bytes in a text (`corpus.tokens.token_bytes`), remembered: windows repeat
    their tokens. Bytes, not `decode([id])`: a character split over tokens decodes to U+FFFD token
    by token; `corpus.tokens.stitch` turns a window's bytes into its display strings."""
    pieces: dict[int, bytes] = {}

    def decode(ids: list[int]) -> list[bytes]:
        missing = list(dict.fromkeys(i for i in ids if i not in pieces))
        pieces.update(zip(missing, token_bytes(tokenizer, missing), strict=True))
        return [pieces[i] for i in ids]

    return decode
