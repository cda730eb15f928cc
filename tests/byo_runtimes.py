"""Runtime classes of the tests' own ("bring your own model"), which registry entries name with
``"runtime": "tests.byo_runtimes:<Class>"`` once the app's args list this module in ``runtime_modules``.

``TfidfClassifier`` is a model no transformers pipeline covers: a scikit-learn TF-IDF and logistic
regression text classifier, trained at load from the ``train.tsv`` (label, tab, text) in its source folder.
Its ``parameters`` may hold ``delay_s``, a pause before each batch (a slower model, for the batching test).
The others fail one part of the runtime contract each."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from deployments.runtimes import ModelRuntime


class TfidfClassifier(ModelRuntime):
    task = "text-classification"

    def load(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        folder, _ = self.model_files()
        with open(Path(folder) / "train.tsv", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        self.model = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0))
        self.model.fit([text for _, text in rows], [label for label, _ in rows])

    def predict(self, inputs: list[str]) -> list[dict[str, float]]:
        time.sleep(float(self.spec.parameters.get("delay_s", 0)))  # a slower model, for the batching test
        labels = self.model.classes_
        return [dict(zip(labels, map(float, p), strict=True)) for p in self.model.predict_proba(inputs)]

    def unload(self) -> None:
        self.model = None

    def size_bytes(self) -> int:
        vectorizer, regression = self.model[0], self.model[-1]
        vocabulary = vectorizer.vocabulary_  # word -> column, a dict: most of a TF-IDF model's memory
        words = sys.getsizeof(vocabulary) + sum(sys.getsizeof(w) + sys.getsizeof(c) for w, c in vocabulary.items())
        return int(words + vectorizer.idf_.nbytes + regression.coef_.nbytes + regression.intercept_.nbytes)


class FailsToLoad(ModelRuntime):
    def load(self) -> None:
        raise RuntimeError("the license server did not answer")

    def predict(self, inputs):
        raise AssertionError("never loaded")


class FailsToLoadAndToUnload(ModelRuntime):
    """Fails its load before it has a model, then fails in ``unload`` too, which drops a model it never got."""

    def load(self) -> None:
        raise RuntimeError("the license server did not answer")

    def unload(self) -> None:
        del self.model

    def predict(self, inputs):
        raise AssertionError("never loaded")


class FailsToPrepare(ModelRuntime):
    """Loads, then fails in ``prepare``, before its inputs join a batch."""

    def load(self) -> None:
        pass

    def prepare(self, inputs: list[str]) -> list[str]:
        raise ValueError("no tokenizer for this language")

    def predict(self, inputs):
        raise AssertionError("never prepared")


class BreaksItsContract(ModelRuntime):
    """Loads, then answers a text-classification request with something that is not label scores."""

    def load(self) -> None:
        pass

    def predict(self, inputs: list[str]) -> list[str]:
        return ["positive" for _ in inputs]


class FailsNoisily(ModelRuntime):
    """Loads, then fails on every input as a library might: naming an object by its address, at length."""

    def load(self) -> None:
        pass

    def predict(self, inputs: list[str]) -> list[str]:
        raise RuntimeError(f"cannot handle {object()!r}: " + "more about it " * 5000)


class NotARuntime:
    """A class that does not subclass ModelRuntime."""


class AsyncPredict(ModelRuntime):
    """A runtime whose ``predict`` is a coroutine function, which the worker's threads cannot run."""

    def load(self) -> None:
        pass

    async def predict(self, inputs: list[str]) -> list[list[tuple[str, float]]]:
        return [[("x", 1.0)] for _ in inputs]


def write_training_data(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.tsv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    return folder


KEYWORDS = [
    ("billing", "my invoice is wrong"),
    ("billing", "I was charged twice this month"),
    ("billing", "refund the payment please"),
    ("billing", "update my credit card"),
    ("shipping", "where is my parcel"),
    ("shipping", "the delivery is late"),
    ("shipping", "track my package"),
    ("shipping", "the courier lost my order"),
]
"""Training data of the tests' TF-IDF support-ticket router: billing or shipping."""


def _wait_for_file(gate: Path) -> None:
    """Until a test creates ``gate``: at most 120 s, so that a test that never opens it fails, and frees the
    replica."""
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class Sized(ModelRuntime):
    """A model of the size its entry's ``parameters`` say (``{"size": bytes}``), that allocates nothing: for
    the memory budget's rules. Each input is answered with its own text as the label. A batch with an input
    that starts with "slow" waits until the file ``parameters["gate"]`` exists (a test opens the gate once
    what must happen beside the slow request has happened), or ``parameters["delay_s"]`` seconds; the load
    takes ``parameters["load_s"]``, or waits until the file ``parameters["load_gate"]`` exists."""

    def load(self) -> None:
        gate = self.spec.parameters.get("load_gate")
        if gate is None:
            time.sleep(float(self.spec.parameters.get("load_s", 0)))
        else:
            _wait_for_file(Path(str(gate)))
        self.loaded = True

    def predict(self, inputs: list[str]) -> list[dict[str, float]]:
        if any(str(text).startswith("slow") for text in inputs):
            gate = self.spec.parameters.get("gate")
            if gate is None:
                time.sleep(float(self.spec.parameters.get("delay_s", 0)))
            else:
                _wait_for_file(Path(str(gate)))
        return [{str(text): 1.0} for text in inputs]

    def size_bytes(self) -> int:
        return int(self.spec.parameters["size"])


class ExitsOnLoad(ModelRuntime):
    """Its load ends in ``sys.exit``, as a library's command-line parsing does."""

    def load(self) -> None:
        sys.exit(2)

    def predict(self, inputs):
        raise AssertionError("never loaded")


class InterruptsPredict(ModelRuntime):
    """Loads, then raises ``KeyboardInterrupt`` from ``predict``."""

    def load(self) -> None:
        self.model = object()

    def predict(self, inputs):
        raise KeyboardInterrupt
