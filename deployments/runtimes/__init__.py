"""Model runtimes, one per task. A new task is one new class, listed here."""

from __future__ import annotations

from deployments.runtimes.base import ModelRuntime
from deployments.runtimes.image_classification import ImageClassificationRuntime
from deployments.runtimes.text_classification import TextClassificationRuntime
from serve_app.core.registry import ModelSpec, Task

RUNTIMES: dict[Task, type[ModelRuntime]] = {
    runtime.task: runtime for runtime in (TextClassificationRuntime, ImageClassificationRuntime)
}


def runtime_for(spec: ModelSpec, device: str | None = None) -> ModelRuntime:
    return RUNTIMES[spec.task](spec, device)


__all__ = ["RUNTIMES", "ModelRuntime", "runtime_for"]
