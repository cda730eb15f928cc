"""Model runtimes: the base every runtime subclasses (``ModelRuntime``, the interface a model of your own
implements: docs/models.md), and what the shipped runtimes share (transformers, images). The runtimes
themselves belong to their tasks (``deployments/tasks``)."""

from __future__ import annotations

from deployments.runtimes.base import ModelRuntime, default_device, runtime_for, torch_bytes

__all__ = ["ModelRuntime", "default_device", "runtime_for", "torch_bytes"]
