"""The process group of a run: one process (plain ``ctsam3d train``) or many (``torchrun``).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; with more than one process the group is
initialised from them (NCCL on CUDA, gloo on CPU) and each process takes GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "auto") -> DistributedContext:
        """The context described by torchrun's environment variables (a single process without them)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        target = resolve_device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        if target.type == "cuda":
            torch.cuda.set_device(target)
        initialised_here = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
            initialised_here = True
        if world_size > 1 and dist.get_world_size() != world_size:
            raise ValueError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} processes")
        return cls(rank, world_size, local_rank, target, initialised_here)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.initialised_here and dist.is_initialized():
            dist.barrier()  # no process leaves while another still communicates
            dist.destroy_process_group()
            self.initialised_here = False
