"""torch.distributed for dataset runs: the rank layout torchrun (or ``accelerate launch``) sets up.

Launchers set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; with a world
size above 1 the runner starts the default process group from them (NCCL for CUDA devices, gloo
otherwise) unless the caller already has, and ends only a group it started.
"""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``; ``started_group``: the runner began it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The sum of ``tensor`` over ranks (sent from ``device``: NCCL only moves CUDA tensors)."""
        if not self.distributed:
            return tensor
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def finish(self) -> None:
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"The environment variable {name}={value!r} is not an integer; launchers (torchrun) set it "
                         "to this process's rank / world size") from None


def join(device_type: str) -> Ranks:
    """This process's :class:`Ranks`, starting the process group when a launcher asked for several processes."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Ranks()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), started_group=True)
