"""A model that takes the bytes its registry entry declares and allocates none of them: the smoke run's
mixed-size fleet (``bench/peers.py``), so that the budget's rules (sizes, evictions by bytes, the router's
victims) run in seconds, without writing or reading hundreds of megabytes. ``make bench`` runs real
models instead (random-initialised BERT-shaped classifiers of about 25 MB, 100 MB and 450 MB).

A registry entry names it with ``"runtime": "bench.sized_runtime:DeclaredSize"`` and ``"parameters":
{"size": <bytes>}``, in an app whose args allow the module (``runtime_modules: [bench.sized_runtime]``).
Each text is answered with one label, the model's id, so that an answer shows which model ran it."""

from __future__ import annotations

from deployments.runtimes import ModelRuntime


class DeclaredSize(ModelRuntime):
    task = "text-classification"

    def load(self) -> None:
        self.loaded = True

    def predict(self, inputs: list[str]) -> list[dict[str, float]]:
        return [{self.spec.id: 1.0} for _ in inputs]

    def size_bytes(self) -> int:
        return int(self.spec.parameters["size"])
