"""What a task answers, and how: the output kinds tasks are made of (``serve_app.core.tasks``).

An output kind is the contract between a model runtime and the protocols, in three steps:

* ``encode`` (in the worker replica, on the model's thread): the runtime's answer for one request, one
  row per input, becomes named numpy arrays, the ``WorkerResult`` that travels to the ingress. A row that
  does not have the kind's form is a ``ContractError``: the worker answers 503 naming the problem;
* ``native`` (in the ingress): one prediction per input, as ``POST /predict`` answers it;
* ``v2``: the Open Inference Protocol's output tensors, which ``outputs`` describes for model metadata.

A kind may also take request parameters of its own (``options``: classification's ``top_k``), which it
applies to each request's encoded answer in the worker (``apply``), whatever runtime made it: they never
reach the runtime's ``predict``.

The kinds shipped here: label scores (classification), one vector per input (embeddings), and labelled
spans of the input text (token classification). A task module may define a kind of its own.
"""

from __future__ import annotations

import logging
import math
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from serve_app.core.errors import ModelFailed, ServeAppError, error_text
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.tensors import TensorSpec, bytes_array, datatype_of

Wire = Mapping[str, np.ndarray]
"""One request's answer between the replicas: named arrays (``WorkerResult.outputs``)."""


class ContractError(ValueError):
    """A runtime answered outside its task's output contract."""


logger = logging.getLogger("ray.serve")


@contextmanager
def output_code(model_id: str, task: str, step: str, runtime_answers: bool = False) -> Iterator[None]:
    """Run one ``step`` of a task's output kind (``encode``, ``apply``, ``native``, ``v2``), or its input kind's
    ``decode``: the code of the task's module, which a task of one's own brings as a runtime of one's own brings
    a model's. Where it raises other than one of this app's errors of a status of its own, the fault is the
    task's, not the request's: a 503 naming the task and the step (``ModelFailed``, without the project's
    paths), its traceback in the log, as for a runtime that raises; never a 500. The app's base error,
    ``ServeAppError`` itself (a 500), is such a fault too. ``runtime_answers``: the step reads a runtime's
    answer (``encode``, ``apply``), so a ``ContractError`` it raises is the runtime's fault, which the caller
    names; in any other step it is the task's."""
    try:
        yield
        return
    except ServeAppError as e:
        if not e.internal:
            raise
        failure: Exception = e
    except ContractError as e:
        if runtime_answers:
            raise
        failure = e
    except Exception as e:
        failure = e
    trace = "".join(traceback.format_exception(failure)).rstrip()
    logger.error("task %r failed to %s for model %r:\n%s", task, step, model_id, trace)
    reason = error_text(failure, lambda text: text.replace(f"{PROJECT_ROOT}/", ""))
    raise ModelFailed(f"Model {model_id!r}: its task {task!r} failed to {step}: {reason}", model_id=model_id) from None


class OutputKind(ABC):
    """How a task's answers are encoded (worker), and shaped for the native API and for v2 (ingress)."""

    @abstractmethod
    def outputs(self) -> list[TensorSpec]:
        """The v2 output tensors, as model metadata describes them (and in the order infer returns them)."""

    @abstractmethod
    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        """One request's rows (one per input, in input order) as the arrays sent to the ingress."""

    @abstractmethod
    def native(self, wire: Wire, count: int) -> list[Any]:
        """One native prediction for each of the request's ``count`` inputs, in input order."""

    options: ClassVar[frozenset[str]] = frozenset()
    """The request parameters this kind applies itself (``apply``), not passed to the runtime."""

    def apply(self, wire: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        """One request's encoded answer with its ``options`` applied (by default there are none)."""
        return wire

    def v2(self, wire: Wire) -> dict[str, np.ndarray]:
        """The v2 output tensors by name, in the order of ``outputs`` (by default, the arrays of that name)."""
        return {spec.name: wire[spec.name] for spec in self.outputs()}


def native_answer(kind: OutputKind, wire: Wire, count: int) -> list[Any]:
    """``kind.native(wire, count)``, checked: one prediction per input, and, from an output kind this app does not
    ship, only values JSON holds (a numpy number, say, is none: pydantic's serializer, which writes the answer,
    would fail on it after the request had been answered 200). A ``ValueError`` otherwise, which the caller's
    ``output_code`` makes the 503 of the task's failed step. The shipped kinds' answers are plain values by
    construction (``tolist``), and skip the check: it would cost as much as writing the answer (0.8 ms for 32
    embeddings of 384 floats on a slow machine). A kind of one's own that subclasses one of them is checked:
    its ``encode`` may give arrays of other items."""
    rows = kind.native(wire, count)
    if not isinstance(rows, list | tuple) or len(rows) != count:
        given = f"{len(rows)} items" if isinstance(rows, list | tuple) else type(rows).__name__
        raise ValueError(f"native must answer a list of one prediction per input: {count} inputs, got {given}")
    rows = list(rows)
    if type(kind) not in _SHIPPED_KINDS:
        try:
            pydantic_core.to_json(rows)
        except pydantic_core.PydanticSerializationError as e:
            raise ValueError(f"native answered a value JSON cannot hold: {e}") from None
    return rows


def v2_tensors(kind: OutputKind, wire: Wire) -> dict[str, np.ndarray]:
    """``kind.v2(wire)``, checked against the model metadata ``kind.outputs()`` declares: the tensors it names, each
    a numpy array of the datatype declared, so that what a client reads in the metadata is what infer answers
    and every protocol can write it. A ``ValueError`` otherwise, as for ``native_answer``."""
    tensors = kind.v2(wire)
    declared = {spec.name: spec.datatype for spec in kind.outputs()}
    if not isinstance(tensors, Mapping) or set(tensors) != set(declared):
        named = sorted(map(str, tensors)) if isinstance(tensors, Mapping) else type(tensors).__name__
        raise ValueError(f"v2 must answer the output tensors the metadata declares, {sorted(declared)}: got {named}")
    for name, datatype in declared.items():
        array = tensors[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"v2 output {name!r} is a {type(array).__name__}, not a numpy array")
        if (given := datatype_of(array)) != datatype:
            raise ValueError(f"v2 output {name!r} is {given}; the model metadata declares {datatype}")
    return {name: tensors[name] for name in declared}


def _floats(values: Any, what: str) -> np.ndarray:
    try:
        if hasattr(values, "detach"):  # a torch tensor, on any device and of any float type (numpy has no bf16)
            values = values.detach().cpu()
            values = values.float() if values.is_floating_point() else values
        given = np.asarray(values)
        if given.dtype.kind in "USO" and given.size and any(isinstance(v, str | bytes) for v in given.flat):
            raise TypeError("text is not a number")  # numpy would read "0.5" as 0.5
        array = given.astype(np.float32)
    except (TypeError, ValueError) as e:
        raise ContractError(f"{what} must be numbers: {e}") from None
    return array


def _number(value: Any, integral: bool = False) -> float | int:
    """A runtime's number (a Python or numpy number, a tensor of one value) as a float, or an int where it must
    be ``integral``; ``TypeError`` for text (which ``float`` would read) or a fraction where an int is due."""
    if isinstance(value, str | bytes):
        raise TypeError(f"text is not a number: {value!r:.40}")
    number = float(value)
    if not integral:
        return number
    if not number.is_integer():
        raise TypeError(f"not a whole number: {number}")
    return int(number)


class Classification(OutputKind):
    """Every label with its score, most likely first.

    A row is a mapping of label to score, or a sequence of ``(label, score)`` pairs or of
    ``{"label", "score"}`` objects; every row of a request names the same number of labels.
    Between the replicas: ``labels`` (BYTES) and ``scores`` (FP32), both ``[inputs, labels]``, sorted by
    score. Native: ``{"label", "score", "scores": [{"label", "score"}, ...]}``. v2: ``label`` (BYTES) and
    ``score`` (FP32), the top label of each input and its score."""

    options = frozenset({"top_k"})

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("label", "BYTES", (-1,)), TensorSpec("score", "FP32", (-1,))]

    def apply(self, wire: dict[str, np.ndarray], top_k: int | None = None) -> dict[str, np.ndarray]:
        """``top_k``: the most likely labels only (``scores`` of each input; its top label is the same)."""
        if top_k is None:
            return wire
        return {"labels": wire["labels"][:, :top_k], "scores": wire["scores"][:, :top_k]}

    @staticmethod
    def _pairs(row: Any) -> list[tuple[str, float]]:
        if isinstance(row, Mapping):
            items = list(row.items())
        elif isinstance(row, Sequence) and not isinstance(row, str | bytes):
            try:
                items = [(r["label"], r["score"]) if isinstance(r, Mapping) else tuple(r) for r in row]
            except (KeyError, TypeError) as e:  # a bare score (predict_proba's rows), a mapping without a key
                raise ContractError(
                    f"a classification row is (label, score) pairs or {{'label', 'score'}} objects: {error_text(e)}"
                ) from None
        else:
            raise ContractError(f"a classification row is label scores, not {type(row).__name__}")
        if not items or any(len(p) != 2 for p in items):
            raise ContractError("a classification row is a non-empty list of (label, score) pairs")
        try:
            pairs = [(str(label), _number(score)) for label, score in items]
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # RuntimeError: a tensor of several
            raise ContractError(f"a classification score must be a number: {error_text(e)}") from None
        # Most likely first; a NaN score (null in the answers) last, where it cannot be taken for the top label.
        return sorted(pairs, key=lambda p: (math.isnan(p[1]), -p[1]))

    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        pairs = [self._pairs(row) for row in rows]
        width = {len(p) for p in pairs}
        if len(width) > 1:
            raise ContractError(f"every input's scores must name the same number of labels, got {sorted(width)}")
        k = width.pop() if width else 0
        labels = bytes_array((label for p in pairs for label, _ in p), (len(pairs), k))
        scores = np.array([[score for _, score in p] for p in pairs], dtype=np.float32).reshape(len(pairs), k)
        return {"labels": labels, "scores": scores}

    def native(self, wire: Wire, count: int) -> list[Any]:
        return [
            {
                "label": labels[0],
                "score": scores[0],
                "scores": [{"label": label, "score": score} for label, score in zip(labels, scores, strict=True)],
            }
            for labels, scores in zip(wire["labels"].tolist(), wire["scores"].tolist(), strict=True)
        ]

    def v2(self, wire: Wire) -> dict[str, np.ndarray]:
        return {"label": wire["labels"][:, 0], "score": wire["scores"][:, 0]}


class ClassificationParameters(BaseModel):
    """What a request for label scores may choose (text and image classification)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="answer the k most likely labels in each input's scores (default: every label); its label "
        "and score are the most likely one's whatever k is",
    )


class EmbeddingOptions(BaseModel):
    """What a request for embeddings may choose of their form (text and image embeddings)."""

    model_config = ConfigDict(extra="forbid")

    dimensions: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="each vector's first d values, for a model trained to embed in fewer dimensions too "
        "(Matryoshka: nomic-embed, mxbai-embed, Arctic Embed); of unit length again where the model's vectors "
        "are (default, or d not fewer than the model's: every value)",
    )


class Embedding(OutputKind):
    """One vector of floats per input, all of one length.

    A row is a 1-D sequence of numbers (a list, a numpy array or a torch tensor). Between the replicas
    and in v2: ``embedding``, FP32 ``[inputs, dimensions]``. Native: ``{"embedding": [...]}``."""

    options = frozenset({"dimensions"})

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", "FP32", (-1, -1))]

    def apply(self, wire: dict[str, np.ndarray], dimensions: int | None = None) -> dict[str, np.ndarray]:
        """``dimensions``: each vector's first d values (a Matryoshka model's smaller embedding, as
        sentence-transformers' ``truncate_dim`` cuts it; every value when d is not fewer than the model's), of
        unit length again where the model's whole vectors were (so that a dot product stays a cosine)."""
        vectors = wire["embedding"]
        if dimensions is None or dimensions >= vectors.shape[1]:
            return wire
        cut = np.array(vectors[:, :dimensions], dtype=np.float32)
        unit = np.isclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # each vector by its own length
        if unit.any():
            lengths = np.linalg.norm(cut[unit], axis=1, keepdims=True)
            cut[unit] = cut[unit] / np.maximum(lengths, np.finfo(np.float32).tiny)
        return {"embedding": cut}

    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        vectors = [_floats(row, "an embedding") for row in rows]
        if any(v.ndim != 1 for v in vectors):
            raise ContractError("an embedding row is one vector (1-D) per input")
        sizes = {v.shape[0] for v in vectors}
        if len(sizes) > 1:
            raise ContractError(f"every input's embedding must have the same length, got {sorted(sizes)}")
        dims = sizes.pop() if sizes else 0
        return {"embedding": np.stack(vectors) if vectors else np.zeros((0, dims), dtype=np.float32)}

    def native(self, wire: Wire, count: int) -> list[Any]:
        return [{"embedding": row} for row in wire["embedding"].tolist()]


ENTITY_FIELDS = ("entity_group", "score", "word", "start", "end")


class Entities(OutputKind):
    """Labelled spans of each input text, as transformers' token-classification pipeline gives them with
    ``aggregation_strategy="simple"``.

    A row is a list of ``{"entity_group", "score", "word", "start", "end"}`` (``start`` and ``end``
    index the input text). Native: that list, per input. Between the replicas and in v2, one element per
    entity of the request, in input order: ``entity_group`` and ``word`` (BYTES), ``score`` (FP32),
    ``start``, ``end`` and ``input`` (the index of the input it was found in; INT64)."""

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("entity_group", "BYTES", (-1,)),
            TensorSpec("word", "BYTES", (-1,)),
            TensorSpec("score", "FP32", (-1,)),
            TensorSpec("start", "INT64", (-1,)),
            TensorSpec("end", "INT64", (-1,)),
            TensorSpec("input", "INT64", (-1,)),
        ]

    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        found: list[tuple[int, Mapping]] = []
        for i, row in enumerate(rows):
            if not isinstance(row, Sequence) or isinstance(row, str | bytes):
                raise ContractError(f"an entities row is a list of entities, not {type(row).__name__}")
            for entity in row:
                if not isinstance(entity, Mapping) or any(f not in entity for f in ENTITY_FIELDS):
                    raise ContractError(f"an entity is a mapping with {', '.join(ENTITY_FIELDS)}")
                found.append((i, entity))
        try:
            spans = [(_number(e["start"], integral=True), _number(e["end"], integral=True)) for _, e in found]
            wire = {
                "entity_group": bytes_array(str(e["entity_group"]) for _, e in found),
                "word": bytes_array(str(e["word"]) for _, e in found),
                "score": np.array([_number(e["score"]) for _, e in found], dtype=np.float32),
                "start": np.array([start for start, _ in spans], dtype=np.int64),
                "end": np.array([end for _, end in spans], dtype=np.int64),
                "input": np.array([i for i, _ in found], dtype=np.int64),
            }
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ContractError(f"an entity's score, start and end must be numbers: {error_text(e)}") from None
        if any(not 0 <= start <= end for start, end in spans):
            raise ContractError("an entity's start and end index its input text: 0 <= start <= end")
        return wire

    def native(self, wire: Wire, count: int) -> list[Any]:
        inputs = wire["input"].tolist()
        out: list[list[dict]] = [[] for _ in range(count)]
        columns = zip(
            wire["entity_group"].tolist(),
            wire["score"].tolist(),
            wire["word"].tolist(),
            wire["start"].tolist(),
            wire["end"].tolist(),
            inputs,
            strict=True,
        )
        for group, score, word, start, end, i in columns:
            out[i].append({"entity_group": group, "score": score, "word": word, "start": start, "end": end})
        return out


_SHIPPED_KINDS = (Classification, Embedding, Entities)
"""The output kinds this app ships, whose native answers are plain values by construction (``native_answer``)."""

CLASSIFICATION = Classification()
EMBEDDING = Embedding()
ENTITIES = Entities()
