"""Checkpoints of a training run: every SAE's weights, Adam state and counters at full width, written
once as one atomic folder and read back one block at a time, so neither holds a second copy of a
wide SAE."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from gemmascope.common import distributed
from gemmascope.common.distributed import Partition
from gemmascope.common.files import atomic_dir
from gemmascope.models import SiteKey
from gemmascope.train.config import SAESpec, TrainConfig
from gemmascope.train.state import Norm, Run, full_state, new_run


def save_checkpoint(
    ckpt: Path,
    runs: list[Run],
    norms: dict[SiteKey, Norm],
    step: int,
    split: Partition = Partition(),  # noqa: B008 - frozen
) -> None:
    """Weights, optimizer state and counters of every SAE at full width, written once (rank 0) as
    one atomic folder, so a run resumes on any number of ranks.

    Tensors are written from the run's own memory where it is on the CPU (no copy): one kept as the
    transpose of a row-major array (W_enc and its Adam state) is saved as that array, under its
    key with `.T` appended (`0.params.W_enc.T`, shape `[m, d]`); `load_checkpoint` reads either."""
    tensors: dict[str, Tensor] = {}
    extra = {}
    for i, run in enumerate(runs):
        for key, t in full_state(run, split).items():
            if t.is_contiguous():
                tensors[f"{i}.{key}"] = t
            else:
                tensors[f"{i}.{key}{_TRANSPOSED}"] = t.T
        extra[run.spec.name] = {"index": i, "batchtopk_threshold": run.batchtopk_threshold}
    tensors.update({f"mean.{k[0]}.{k[1]}": n.mean.contiguous() for k, n in norms.items()})
    tensors.update(
        {f"dims.{k[0]}.{k[1]}": n.dims.contiguous() for k, n in norms.items() if n.dims is not None}
    )
    if not distributed.is_main():
        return
    with atomic_dir(ckpt) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        state = {
            "step": step,
            "scales": [[k[0], k[1], n.scale] for k, n in norms.items()],
            "runs": extra,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


_TRANSPOSED = ".T"
"""Suffix of a checkpoint key holding the transpose of the tensor its key names."""


def load_checkpoint(ckpt: Path, specs: list[SAESpec], cfg: TrainConfig):
    """The step, normalisation and runs saved by `save_checkpoint` (or by a version before it saved
    transposed keys and `adam_last`). Each tensor is read a block of rows at a time straight into
    the new run's own, so the memory needed is the runs' plus one block."""
    state = json.loads((ckpt / "state.json").read_text())
    missing = [s.name for s in specs if s.name not in state["runs"]]
    if missing:
        raise ValueError(
            f"{ckpt}: the checkpoint has no state for {missing}; resume with the same sweep"
        )
    runs = []
    with _Stored(ckpt / "state.safetensors") as stored:
        norms = {}
        for layer, site, c in state["scales"]:
            dims = f"dims.{layer}.{site}"
            dims_t = stored.tensor(dims) if stored.has(dims) else None
            norms[(layer, site)] = Norm(stored.tensor(f"mean.{layer}.{site}"), c, dims_t)
        for s in specs:
            info = state["runs"][s.name]
            i = info["index"]
            d_in = stored.shape(f"{i}.params.W_enc" + (".0" if s.n_layers else ""))[0]
            run = new_run(s, d_in, cfg, i)
            with torch.no_grad():
                for n, q in run.params.named_parameters():
                    stored.read_into(f"{i}.params.{n}", q.data)
                adam = {}
                for name in stored.names(f"{i}.adam."):
                    into = run.adam_v.get(name)
                    if into is None:  # the first moment, kept when beta1 > 0
                        q = run.params.get_parameter(name.removesuffix(".m"))
                        into = torch.empty_like(q.detach())
                    adam[name] = stored.read_into(f"{i}.adam.{name}", into)
                run.adam_v = adam
                stored.read_into(f"{i}.last_fired", run.last_fired)
                if run.adam_last is not None:
                    if stored.has(f"{i}.adam_last"):
                        stored.read_into(f"{i}.adam_last", run.adam_last)
                    else:  # saved by the dense optimizer: every row is up to date
                        run.adam_last.fill_(state["step"])
            run.batchtopk_threshold = info["batchtopk_threshold"]
            runs.append(run)
    return state["step"], norms, runs


class _Stored:
    """A checkpoint's safetensors file, its tensors by logical key whether saved as themselves or
    transposed (key + `_TRANSPOSED`), read with plain reads a block at a time into the tensors
    they restore. (safetensors' `safe_open` would hold a whole tensor per slice with its `pread`
    backend, and with `mmap` leave every page read resident until the file is closed.)"""

    BLOCK = 64 << 20
    """Bytes read at a time (straight into the tensor where its layout and dtype allow, else
    through a scratch block that size)."""
    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip

    def __init__(self, file: Path) -> None:
        self.file = file
        self.fh = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by __exit__
        try:
            size = file.stat().st_size
            n = int.from_bytes(self.fh.read(8), "little")
            header = json.loads(self.fh.read(n)) if 8 + n <= size else None
            if not isinstance(header, dict):
                raise ValueError("no header")
            header.pop("__metadata__", None)
            self.base, self.entries = 8 + n, {}
            for key, e in header.items():
                dtype, shape, (begin, end) = self.DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
                shape = tuple(shape)
                nbytes = math.prod(shape) * dtype.itemsize
                if not 0 <= begin <= end == begin + nbytes <= size - self.base:
                    raise ValueError(f"{key!r} lies outside the file")
                self.entries[key] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError) as e:
            self.fh.close()
            raise ValueError(f"{file}: not a readable safetensors file ({e}); it is damaged") from e

    def __enter__(self) -> _Stored:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def has(self, key: str) -> bool:
        return key in self.entries or key + _TRANSPOSED in self.entries

    def names(self, prefix: str) -> list[str]:
        """Logical keys starting with `prefix`, without it."""
        keys = {k.removesuffix(_TRANSPOSED) for k in self.entries if k.startswith(prefix)}
        return sorted(k[len(prefix) :] for k in keys)

    def _stored(self, key: str) -> tuple[str, bool]:
        if key in self.entries:
            return key, False
        if key + _TRANSPOSED in self.entries:
            return key + _TRANSPOSED, True
        raise ValueError(f"{self.file}: the checkpoint has no tensor {key!r}; it is damaged")

    def shape(self, key: str) -> tuple[int, ...]:
        name, transposed = self._stored(key)
        shape = self.entries[name][1]
        return shape[::-1] if transposed else shape

    def tensor(self, key: str) -> Tensor:
        name, transposed = self._stored(key)
        dtype, shape, _ = self.entries[name]
        t = self.read_into(name, torch.empty(shape, dtype=dtype))
        return t.T if transposed else t

    def read_into(self, key: str, into: Tensor) -> Tensor:
        """Copy the tensor saved under `key` into `into` (same shape; cast if the dtype differs);
        returns `into`."""
        name, transposed = self._stored(key)
        dtype, shape, begin = self.entries[name]
        dst = into.T if transposed else into
        if shape != tuple(dst.shape):
            raise ValueError(
                f"{self.file}: {name!r} has shape {shape}, the run {tuple(dst.shape)}; resume with "
                "the same sweep"
            )
        if dst.numel() == 0:
            return into
        if dst.dim() > 2 and not dst.is_contiguous():  # not a layout `full_state` saves
            dst.copy_(self.tensor(name))
            return into
        rows = dst.reshape(1, 1) if dst.dim() == 0 else dst.unsqueeze(1) if dst.dim() == 1 else dst
        rows = rows.view(rows.shape[0], -1) if rows.dim() > 2 else rows
        direct = rows.is_contiguous() and rows.dtype == dtype and rows.device.type == "cpu"
        row_bytes = rows[0].numel() * dtype.itemsize
        step = max(1, self.BLOCK // row_bytes)
        for a in range(0, rows.shape[0], step):
            part = rows[a : a + step]
            buf = part if direct else torch.empty(part.shape, dtype=dtype)
            raw = buf.detach().view(-1).view(torch.uint8).numpy()
            self._read(self.base + begin + a * row_bytes, raw)
            if not direct:
                part.copy_(buf)
        return into

    def _read(self, offset: int, out: Any) -> None:
        view, done = memoryview(out), 0
        self.fh.seek(offset)
        while done < len(view):
            n = self.fh.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.file}: ends before its tensors do; it is damaged")
            done += n
