from __future__ import annotations

from deployments.runtimes.base import PipelineRuntime, Scores
from serve_app.core.registry import Task


class TextClassificationRuntime(PipelineRuntime):
    """Strings in, labels out. Text longer than the model's maximum length is truncated."""

    task = Task.TEXT_CLASSIFICATION

    def predict(self, inputs: list[str]) -> list[Scores]:
        return self._run(list(inputs), truncation=True)
