"""Many processes, one run: who we are under `torchrun`, and the few collectives the trainer uses.

Under `torchrun --nproc-per-node N gemmascope ...` every process runs the same command; `RANK`,
`WORLD_SIZE` and `LOCAL_RANK` in its environment say which one it is. `init()` joins the process group
with the backend the device wants (nccl for CUDA, gloo otherwise). Without torchrun (no `WORLD_SIZE`,
or 1) every helper here is a no-op, so one process is simply a world of one.

A training step is split one of two ways (`Partition`): by rows of the batch (data parallel: every rank
holds the whole SAE, gradients are summed) or by latents (every rank holds a slice of the latents:
its columns of W_enc, rows of W_dec, entries of b_enc and threshold; reconstructions are summed).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def world_size() -> int:
    """Processes in the run (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in the run, 0 .. world_size() - 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (which GPU it takes)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes logs, manifests, checkpoints and SAEs."""
    return rank() == 0


def active() -> bool:
    """Whether a process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: torch.device) -> bool:
    """Join the process group when launched with more than one process; return whether we did.

    The backend is nccl for CUDA devices and gloo otherwise; `MASTER_ADDR`/`MASTER_PORT` come from
    torchrun (or SLURM's launcher). The group is torn down at exit.
    """
    if world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_finish)
    return True


def _finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if active():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks, in place; returns `t`."""
    if active():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average `t` over ranks, in place; returns `t`."""
    if active():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_min(t: Tensor) -> Tensor:
    """Minimum of `t` over ranks, in place; returns `t`."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_cat(t: Tensor, dim: int = 0) -> Tensor:
    """Every rank's `t` concatenated along `dim` in rank order; sizes along `dim` may differ."""
    if not active():
        return t
    n = torch.tensor([t.shape[dim]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(sizes))
    pad = list(t.shape)
    pad[dim] = most - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes, strict=True)], dim)


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (picklable objects only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result, or the error it raised, to every rank.

    The other ranks wait meanwhile, so this is also a barrier; a failure on rank 0 is raised on
    every rank instead of leaving them waiting in the next collective.
    """
    if not active():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # handed to every rank below
            error = e
    result, error = broadcast_object((result, error))  # type: ignore[misc]
    if error is not None:
        raise error
    return result


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_range(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """`[lo, hi)` of rank `index` (default: this rank) when `n` items are cut into `count` (default:
    the world) contiguous slices whose sizes differ by at most one."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


@dataclass(frozen=True)
class Partition:
    """How one SAE step is shared among the ranks; `Partition()` is one process doing it all."""

    rows: bool = False
    """Data parallel: this rank holds a slice of the batch's rows and the whole SAE."""
    latents: bool = False
    """Latent sharding: this rank holds a slice of the latents and the whole batch."""

    def over_rows(self, t: Tensor) -> Tensor:
        """Sum `t` over the ranks that hold other rows of the batch (in place)."""
        return all_reduce_sum(t) if self.rows else t

    def over_latents(self, t: Tensor) -> Tensor:
        """Sum `t` over the ranks that hold other latents (in place)."""
        return all_reduce_sum(t) if self.latents else t

    def over_all(self, t: Tensor) -> Tensor:
        """Sum `t` over every rank that holds part of the step (in place)."""
        return all_reduce_sum(t) if self.rows or self.latents else t

    def min_all(self, t: Tensor) -> Tensor:
        """Minimum of `t` over every rank that holds part of the step (in place)."""
        return all_reduce_min(t) if self.rows or self.latents else t

    def gather(self, t: Tensor, dim: int) -> Tensor:
        """Every rank's `t` concatenated along `dim` (identity when the step is not split)."""
        return all_gather_cat(t, dim) if self.rows or self.latents else t


def gather_cat(t: Tensor, dim: int = 0) -> Tensor | None:
    """Every rank's `t` concatenated along `dim` on rank 0 (None elsewhere); sizes may differ.

    Only rank 0 ever holds the whole, so a wide SAE can be saved without every GPU holding it.
    """
    if not active():
        return t
    n = torch.tensor([t.shape[dim]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    pad = list(t.shape)
    pad[dim] = int(max(sizes)) - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes] if is_main() else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes, strict=True)], dim)
