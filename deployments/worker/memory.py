"""A worker replica's memory: what it took before any model (its baseline), what its models may take (its
budget: ``worker.memory_bytes``, which Ray reserves for the replica, less the baseline), and what they take.

The budget counts every copy whose memory is not given back yet: the copies Serve's cache holds, and those
evicted while requests still run on them (freed when the last one is done). A copy counts for
``ModelCopy.size_bytes``, as measured at its load. On a CUDA device (untested here: no GPU on the machines
this was built on) the budget is device memory: ``worker.gpu_memory_bytes``, else the device's memory less
what torch reserved at start; a copy then counts for its weights or for what torch allocated on the device
during its load, whichever is larger, not for the host memory its load took.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from deployments.runtimes.base import default_device
from deployments.worker.copies import ModelCopy, resident_bytes
from serve_app.core.schemas import ReplicaMemory

logger = logging.getLogger("ray.serve")


class MemoryBudget:
    def __init__(
        self, memory_bytes: int | None, gpu_memory_bytes: int | None = None, device: str | None = None
    ) -> None:
        """Measures the baseline: call it once the replica has imported what it needs (torch, transformers)."""
        self.device = device or default_device()
        if self.device.startswith("cuda"):
            import torch

            self.baseline = torch.cuda.memory_reserved()
            total = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
            self.budget: int | None = gpu_memory_bytes or total - self.baseline
        else:
            self.baseline = resident_bytes() or 0
            self.budget = None if memory_bytes is None else max(0, memory_bytes - self.baseline)
        logger.info(
            "memory on %s: baseline %d bytes, budget for models %s",
            self.device,
            self.baseline,
            "none (count only)" if self.budget is None else f"{self.budget} bytes",
        )

    @staticmethod
    def live(copies: Iterable[ModelCopy]) -> list[ModelCopy]:
        """The copies whose memory is not given back yet."""
        return [c for c in copies if not c.released.is_set()]

    @staticmethod
    def used(copies: Iterable[ModelCopy]) -> int:
        return sum(c.size_bytes or 0 for c in copies)

    def fits(self, used: int, size: int) -> bool:
        return self.budget is None or used + size <= self.budget

    def report(self, copies: Iterable[ModelCopy], lingering: Iterable[ModelCopy]) -> ReplicaMemory:
        live = self.live(copies)
        return ReplicaMemory(
            device=self.device,
            budget_bytes=self.budget,
            used_bytes=self.used(live),
            lingering_bytes=self.used(self.live(lingering)),
            baseline_bytes=self.baseline,
            resident_bytes=resident_bytes(),
        )
