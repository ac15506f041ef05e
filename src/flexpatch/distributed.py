"""Work across the processes ``torchrun`` starts: which process this is, and the few collectives
training and prediction need.

flexpatch writes no launcher of its own: ``torchrun --nproc-per-node N -m flexpatch train ...``
(and ``--nnodes`` with a rendezvous endpoint across machines) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`current` reads them. Without them (a plain ``flexpatch`` or a library call)
the run is one process and every method here is the identity, so single-process code pays nothing.

Process groups are NCCL on CUDA and gloo on the CPU; each process takes the GPU of its local rank.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flexpatch.errors import FlexPatchError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Long enough for rank 0 to preprocess a large dataset while the others wait at the barrier.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (one per device)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that alone writes files, logs and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, dev: torch.device) -> torch.device:
        """This process's device: on CUDA the GPU of its local rank, else ``dev``."""
        import torch

        if not self.active or dev.type != "cuda":
            return dev
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def start(self, dev: torch.device | str = "cpu") -> None:
        """Join the process group, once per process: NCCL when ``dev`` is a GPU, else gloo (which
        also carries the small objects of prediction, sweeps and evaluation, whatever computes)."""
        import torch
        import torch.distributed as td

        if self.active and not td.is_initialized():
            dev = torch.device(dev)
            cuda = dev.type == "cuda"
            td.init_process_group(
                "nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=dev if cuda else None
            )

    def wrap(self, module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
        """What a trainer's steps run through: under torchrun ``module`` in DistributedDataParallel
        (the processes' gradients averaged as their shares' loss is summed), else ``module`` itself;
        validation and checkpoints use ``module``."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def barrier(self) -> None:
        import torch.distributed as td

        if self.active and td.is_initialized():
            td.barrier()

    def split(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world``-th, from its rank on."""
        return list(items[self.rank :: self.world])

    def gather(self, mine: Sequence[T]) -> list[T]:
        """Every process's :meth:`split` share put back in the order of the whole list, on every
        process (objects are pickled between processes of the same run, never read from a file)."""
        if not self.active:
            return list(mine)
        import torch.distributed as td

        shares: list[Any] = [None] * self.world
        td.all_gather_object(shares, list(mine))
        whole: list[T] = []
        for i in range(max(len(s) for s in shares)):
            whole.extend(s[i] for s in shares if i < len(s))
        return whole

    def broadcast(self, value: T) -> T:
        """The main process's ``value`` on every process."""
        if not self.active:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def fail(self, message: str) -> None:
        """Stop every process for an error each finds alike (the same settings): the main process
        raises it, the others a :class:`MainFailed`, so that the command line says it once."""
        raise (FlexPatchError if self.main else MainFailed)(message)

    def on_main(self, work: Callable[[], T]) -> T:
        """``work()`` done by the main process (which may write files), its result on every process.
        A user error there is raised on every process, the others' marked :class:`MainFailed` (the
        command line prints it once, from the main process)."""
        if not self.active:
            return work()
        if not self.main:
            outcome = self.broadcast(None)
        else:
            try:
                outcome = ("ok", work())
            except (FlexPatchError, OSError) as e:
                self.broadcast(("error", str(e)))
                raise
            self.broadcast(outcome)
        if outcome[0] == "error":
            raise MainFailed(outcome[1])
        return outcome[1]

    def samples(self, batch: int) -> range:
        """The samples of a step's global ``batch`` this process trains on: a contiguous share, so
        that sample ``i`` is the same patch whatever the number of processes."""
        if batch < self.world:
            self.fail(
                f"a batch of {batch} cannot be split across {self.world} processes: "
                f"use a global batch of at least {self.world}"
            )
        return range(self.rank * batch // self.world, (self.rank + 1) * batch // self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, differentiably: the backward pass sums the
        gradients too, so a loss computed from summed statistics has every sample's gradient."""
        return _sum_function().apply(tensor) if self.active else tensor


@functools.cache
def _sum_function() -> Any:
    """An all-reduce (sum) whose backward pass is an all-reduce of the gradients (torch's own
    ``torch.distributed.nn`` one is deprecated; the functional collectives' are private)."""
    import torch
    import torch.distributed as td

    class Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.clone(memory_format=torch.contiguous_format)
            td.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            out = grad.clone(memory_format=torch.contiguous_format)
            td.all_reduce(out)
            return out

    return Sum


class MainFailed(FlexPatchError):
    """The main process's user error, raised in the others too so that every process stops."""


def current() -> Dist:
    """This process's place, from the environment ``torchrun`` sets (one process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise FlexPatchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise FlexPatchError(f"RANK {rank} is not one of WORLD_SIZE {world} processes")
    return Dist(rank, world, local)


def stop() -> None:
    """Leave the process group (at the end of a command), so that torchrun's processes exit cleanly."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
