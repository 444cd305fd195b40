"""Sharing sample generation between ranks started by ``torchrun`` (torch.distributed, gloo).

Without ``WORLD_SIZE`` > 1 in the environment everything runs in one process and torch is not
imported. Under torchrun each rank generates a contiguous share of the sample indices, and rank
0 gathers the shares in rank order. Because sample i is drawn from noise seeded by (seed, i),
the gathered set equals a single-process run on the same indices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class RankContext:
    """This process's rank, the world size and whether torch.distributed is in use."""

    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> np.ndarray:
        """Return this rank's contiguous share of the indices ``0 .. count-1``."""
        first = self.rank * count // self.world_size
        last = (self.rank + 1) * count // self.world_size
        return np.arange(first, last)

    def gather(self, array: np.ndarray) -> np.ndarray | None:
        """Concatenate every rank's array in rank order on rank 0; other ranks get None."""
        if not self.distributed:
            return array
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, array)
        return np.concatenate(parts, axis=0) if self.is_main else None

    def broadcast(self, value: Any) -> Any:
        """Return rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.distributed = False


def rank_context() -> RankContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; else return a single rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return RankContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    context = RankContext(rank=dist.get_rank(), world_size=dist.get_world_size(), distributed=True)
    logger.info("Rank %d of %d joined the process group (gloo).", context.rank, context.world_size)
    return context
