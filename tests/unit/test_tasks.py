"""Tasks as the unit of extension: the catalog the app's args make, and each output kind's contract between
a runtime and the protocols (encoded in the worker, shaped natively and for v2 in the ingress)."""

import sys
import types

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb

from serve_app.core.inputs import TEXT
from serve_app.core.outputs import CLASSIFICATION, EMBEDDING, ENTITIES, ContractError
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import RuntimeImportError, Task, TaskCatalog, TaskConfigError
from serve_app.core.tensors import bytes_array, datatype_of, json_data, raw_data

# -- classification ---------------------------------------------------------------------------------------


def test_classification_answers_as_the_seed_did_field_for_field():
    wire = CLASSIFICATION.encode([[("negative", 0.25), ("positive", 0.75)], {"a": 0.1, "b": 0.9}])
    assert CLASSIFICATION.native(wire, 2) == [
        {
            "label": "positive",
            "score": 0.75,
            "scores": [{"label": "positive", "score": 0.75}, {"label": "negative", "score": 0.25}],
        },
        {
            "label": "b",
            "score": pytest.approx(0.9),
            "scores": [{"label": "b", "score": pytest.approx(0.9)}, {"label": "a", "score": pytest.approx(0.1)}],
        },
    ]
    assert list(CLASSIFICATION.native(wire, 2)[0]) == ["label", "score", "scores"]  # the seed's field order
    v2 = CLASSIFICATION.v2(wire)
    assert list(v2) == [o.name for o in CLASSIFICATION.outputs()] == ["label", "score"]
    assert json_data(v2["label"]) == ["positive", "b"] and v2["score"].dtype == np.float32


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[("a", 0.5), ("b", 0.5)], [("a", 1.0)]], "same number of labels"),
        (["positive"], "label scores, not str"),
        ([[]], "non-empty"),
        ([[("a", "high")]], "score must be a number"),
        ([[0.9, 0.1]], r"\(label, score\) pairs or \{'label', 'score'\} objects"),  # predict_proba's rows
        ([[{"label": "a"}]], r"\(label, score\) pairs"),
        ([[("a", 10**400)]], "score must be a number"),
        ([[("a", np.array([0.1, 0.2]))]], "score must be a number"),
        ([[("a", "0.9")]], "score must be a number"),  # text that float() would read
    ],
)
def test_classification_rows_outside_the_contract_are_refused(rows, match):
    with pytest.raises(ContractError, match=match):
        CLASSIFICATION.encode(rows)


def test_top_k_keeps_each_inputs_most_likely_labels_and_the_same_top_label():
    wire = CLASSIFICATION.encode([{"a": 0.1, "b": 0.6, "c": 0.3}, {"a": 0.5, "b": 0.2, "c": 0.3}])
    top = CLASSIFICATION.apply(wire, top_k=2)
    assert [[s["label"] for s in p["scores"]] for p in CLASSIFICATION.native(top, 2)] == [["b", "c"], ["a", "c"]]
    assert json_data(CLASSIFICATION.v2(top)["label"]) == json_data(CLASSIFICATION.v2(wire)["label"]) == ["b", "a"]
    assert CLASSIFICATION.apply(wire, top_k=10)["labels"].shape == (2, 3)  # more than the labels: every one
    assert CLASSIFICATION.apply(wire) is wire


@pytest.mark.parametrize("top_k", [0, -1, "5", 2.0, True])
def test_top_k_is_a_whole_number_of_at_least_one(top_k):
    from serve_app.core.errors import InvalidInput

    task = TaskCatalog.load().task_of(ModelSpec(id="s", task="text-classification", source={"path": "x"}))
    assert task.request_parameters({"top_k": 3}) == {"top_k": 3}
    with pytest.raises(InvalidInput, match=r"parameters\.top_k"):
        task.request_parameters({"top_k": top_k})


def test_a_nan_score_is_never_the_top_label():
    wire = CLASSIFICATION.encode([[("a", 0.1), ("b", float("nan")), ("c", 0.9)]])
    answer = CLASSIFICATION.native(wire, 1)[0]
    assert answer["label"] == "c" and [s["label"] for s in answer["scores"]] == ["c", "a", "b"]


# -- embeddings ---------------------------------------------------------------------------------------


def test_an_embedding_is_one_fp32_vector_per_input():
    import torch

    wire = EMBEDDING.encode([np.array([1.0, 2.0]), [3, 4], torch.tensor([5.0, 6.0])])
    assert wire["embedding"].dtype == np.float32 and wire["embedding"].shape == (3, 2)
    assert EMBEDDING.native(wire, 3) == [
        {"embedding": [1.0, 2.0]},
        {"embedding": [3.0, 4.0]},
        {"embedding": [5.0, 6.0]},
    ]
    assert [(o.name, o.datatype, o.shape) for o in EMBEDDING.outputs()] == [("embedding", "FP32", (-1, -1))]


def test_dimensions_cut_each_vector_and_keep_unit_vectors_of_unit_length():
    unit = EMBEDDING.encode([np.array([0.6, 0.0, 0.8, 0.0]), np.array([0.0, 0.6, 0.0, 0.8])])
    cut = EMBEDDING.apply(unit, dimensions=2)["embedding"]
    assert cut.dtype == np.float32 and cut.shape == (2, 2)
    np.testing.assert_allclose(cut, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)  # 0.6, 0 again of unit length
    # Each vector by its own length: one that is not of unit length (a NaN, zeros) leaves the others' as they were.
    mixed = EMBEDDING.encode([[0.6, 0.8, 0.0], [float("nan")] * 3, [0.0, 0.0, 0.0]])
    cut = EMBEDDING.apply(mixed, dimensions=1)["embedding"]
    assert cut[0].tolist() == [1.0] and np.isnan(cut[1, 0]) and cut[2].tolist() == [0.0]
    raw = EMBEDDING.encode([[3.0, 4.0, 12.0]])  # not of unit length: the first values as they are
    np.testing.assert_allclose(EMBEDDING.apply(raw, dimensions=2)["embedding"], [[3.0, 4.0]])
    assert EMBEDDING.apply(raw, dimensions=3) is raw and EMBEDDING.apply(raw, dimensions=99) is raw
    task = TaskCatalog.load().get("feature-extraction")
    assert task.request_parameters({"dimensions": 64, "prompt_name": "query"}) == {
        "dimensions": 64,
        "prompt_name": "query",
    }
    from serve_app.core.errors import InvalidInput

    for bad in (0, "64", 1.5, True):
        with pytest.raises(InvalidInput, match=r"parameters\.dimensions"):
            task.request_parameters({"dimensions": bad})


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[1.0, 2.0], [1.0]], "same length"),
        ([[[1.0], [2.0]]], "1-D"),
        ([["x"]], "numbers"),
        ([["1", "2"]], "numbers"),  # text that numpy would read as numbers
        ([np.array(["0.5", "1.5"], dtype=object)], "numbers"),
    ],
)
def test_embeddings_outside_the_contract_are_refused(rows, match):
    with pytest.raises(ContractError, match=match):
        EMBEDDING.encode(rows)


# -- entities -----------------------------------------------------------------------------------------


ALICE = {"entity_group": "PER", "score": np.float32(0.98), "word": "alice", "start": 0, "end": 5}
PARIS = {"entity_group": "LOC", "score": 0.9, "word": "paris", "start": 15, "end": 20}


def test_entities_keep_each_inputs_own_list_even_an_empty_one():
    wire = ENTITIES.encode([[ALICE, PARIS], [], [ALICE]])
    native = ENTITIES.native(wire, 3)
    assert [[e["word"] for e in row] for row in native] == [["alice", "paris"], [], ["alice"]]
    assert native[0][0] == {"entity_group": "PER", "score": pytest.approx(0.98), "word": "alice", "start": 0, "end": 5}
    assert ENTITIES.native(ENTITIES.encode([[], []]), 2) == [[], []]  # the trailing inputs too
    v2 = ENTITIES.v2(wire)
    assert list(v2) == ["entity_group", "word", "score", "start", "end", "input"]
    assert v2["input"].tolist() == [0, 0, 2] and v2["start"].dtype == np.int64


def test_an_entity_without_its_fields_is_refused():
    with pytest.raises(ContractError, match="entity_group, score, word, start, end"):
        ENTITIES.encode([[{"word": "x"}]])
    with pytest.raises(ContractError, match="list of entities"):
        ENTITIES.encode(["PER"])
    with pytest.raises(ContractError, match="must be numbers"):  # a runtime of one's own that gives no offsets
        ENTITIES.encode([[{**ALICE, "start": None, "end": None}]])
    with pytest.raises(ContractError, match="must be numbers"):
        ENTITIES.encode([[{**ALICE, "end": float("inf")}]])
    for wrong in ({"score": "0.9"}, {"start": "0"}, {"end": 4.5}):  # text, or a fraction of a character
        with pytest.raises(ContractError, match="must be numbers"):
            ENTITIES.encode([[{**ALICE, **wrong}]])
    for span in ((-1, 5), (5, 0)):  # start and end index the text
        with pytest.raises(ContractError, match="0 <= start <= end"):
            ENTITIES.encode([[{**ALICE, "start": span[0], "end": span[1]}]])
    assert ENTITIES.encode([[{**ALICE, "start": np.int64(0), "end": 5.0}]])["end"].tolist() == [5]


# -- tensors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32),
        np.array([1, -2, 3], dtype=np.int64),
        np.array([True, False]),
        bytes_array(["é", b"\x00raw", "plain"]),
    ],
    ids=["FP32 [2,2]", "INT64", "BOOL", "BYTES"],
)
def test_raw_tensors_read_back_as_tritonclient_reads_them(array):
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="t", datatype=datatype_of(array), shape=list(array.shape))
    response.raw_output_contents.append(raw_data(array))
    back = triton.InferResult(response).as_numpy("t")
    if array.dtype == object:
        assert back.tolist() == [v.encode() if isinstance(v, str) else v for v in array]
    else:
        np.testing.assert_array_equal(back, array)


def test_json_data_is_row_major_and_bytes_are_text():
    assert json_data(np.arange(6, dtype=np.int64).reshape(2, 3)) == [0, 1, 2, 3, 4, 5]
    assert json_data(bytes_array([b"caf\xc3\xa9", "x"])) == ["café", "x"]


# -- the catalog --------------------------------------------------------------------------------------


def test_the_catalog_is_the_task_modules_the_args_name():
    catalog = TaskCatalog.load()
    assert catalog.names == [
        "text-classification",
        "image-classification",
        "feature-extraction",
        "token-classification",
        "image-feature-extraction",
    ]
    assert TaskCatalog.load(["deployments.tasks.feature_extraction"]).names == ["feature-extraction"]
    spec = ModelSpec(id="m", task="feature-extraction", source={"path": "x"})
    assert catalog.runtime_of(spec) == "deployments.tasks.feature_extraction:SentenceEmbeddingRuntime"


@pytest.fixture
def fake_module():
    """Modules the test puts in sys.modules, removed after."""
    added = []

    def add(name, **attrs):
        module = types.ModuleType(name)
        vars(module).update(attrs)
        sys.modules[name] = module
        added.append(name)
        return module

    yield add
    for name in added:
        sys.modules.pop(name, None)


def test_a_module_without_a_task_or_one_missing_stops_the_app(fake_module):
    fake_module("tests_fake_no_task")
    with pytest.raises(TaskConfigError, match="defines no TASK"):
        TaskCatalog.load(["tests_fake_no_task"])
    with pytest.raises(TaskConfigError, match="cannot be imported"):
        TaskCatalog.load(["tests_fake_nowhere"])


def test_two_modules_of_one_task_stop_the_app(fake_module):
    from deployments.tasks import text_classification

    fake_module("tests_fake_twin", TASK=text_classification.TASK)
    with pytest.raises(TaskConfigError, match="two task modules declare the task 'text-classification'"):
        TaskCatalog.load(["deployments.tasks.text_classification", "tests_fake_twin"])


def test_a_runtime_that_cannot_be_imported_is_a_load_error_naming_why(fake_module):
    catalog = TaskCatalog(
        [Task("t", TEXT, CLASSIFICATION, runtimes=(object,))], runtime_modules=["tests_fake_rt", "tests_fake_broken"]
    )
    fake_module("tests_fake_rt", Thing=1)
    for runtime, match in [
        ("tests_fake_rt:Missing", "has no class .Missing. \\(a replica imports a module once"),
        ("tests_fake_rt:Thing", "has no class 'Thing'"),
        ("tests_fake_broken:X", "importing 'tests_fake_broken' failed: ModuleNotFoundError"),
        (
            "elsewhere:X",
            r"not in args.runtime_modules, .* \(now: tests_fake_broken, tests_fake_rt; and the task modules\)",
        ),
        ("tests_fake_rt:Thing\n", "is not of the form package.module:Class"),
        ("tests_fake_rt:Thing.attr", "is not of the form package.module:Class"),
    ]:
        spec = ModelSpec.model_construct(id="m", task="t", runtime=runtime)
        with pytest.raises(RuntimeImportError, match=match):
            catalog.runtime_class(spec)


# -- request parameters -------------------------------------------------------------------------------


def test_a_request_gives_only_the_parameters_its_task_takes_and_defaults_are_not_sent():
    from serve_app.core.errors import InvalidInput

    catalog = TaskCatalog.load()
    embed, classify = catalog.get("feature-extraction"), catalog.get("text-classification")
    assert embed.request_parameters({"prompt_name": "query"}) == {"prompt_name": "query"}
    assert embed.request_parameters({"prompt_name": None}) == {} == embed.request_parameters(None)
    with pytest.raises(
        InvalidInput, match=r"parameters\.top_k: a model of task feature-extraction takes no such parameter"
    ):
        embed.request_parameters({"prompt_name": "query", "top_k": 3})
    with pytest.raises(InvalidInput, match=r"parameters\.prompt_name: Input should be a valid string"):
        embed.request_parameters({"prompt_name": 3})
    with pytest.raises(InvalidInput, match=r"takes no such parameter \(it takes: top_k\)"):
        classify.request_parameters({"prompt_name": "query"})
    with pytest.raises(InvalidInput, match=r"takes no such parameter \(it takes: dimensions\)"):
        catalog.get("image-feature-extraction").request_parameters({"prompt_name": "query"})
    bare = Task(name="bare", input=TEXT, output=CLASSIFICATION, runtimes=(object,))
    with pytest.raises(InvalidInput, match=r"takes no such parameter \(it takes: none\)"):
        bare.request_parameters({"prompt_name": "query"})
    with pytest.raises(InvalidInput) as long_key:  # a client's key is echoed bounded
        classify.request_parameters({"k" * 100_000: 1})
    assert len(str(long_key.value)) < 200 and len(long_key.value.details["field"]) < 100
    with pytest.raises(InvalidInput) as odd_key:  # and escaped: no line break, NUL or reordering mark of its own
        classify.request_parameters({"a\nb\u202e\x00": 1})
    assert odd_key.value.details["field"] == "parameters.a\\nb\\u202e\\x00" and "\n" not in str(odd_key.value)
    ner = catalog.get("token-classification")
    assert ner.request_parameters({"aggregation_strategy": "max"}) == {"aggregation_strategy": "max"}
    with pytest.raises(InvalidInput, match=r"parameters\.aggregation_strategy: Input should be 'simple', 'first'"):
        ner.request_parameters({"aggregation_strategy": "none"})  # no entity groups: outside the task's contract
    # v2 and gRPC requests carry the protocol's own parameters beside the task's: those are left to it.
    assert embed.request_parameters({"timeout": 5, "prompt_name": "query"}, others=True) == {"prompt_name": "query"}
    assert classify.request_parameters({"timeout": 5, "priority": 1}, others=True) == {}


# -- what a task module declares, checked ---------------------------------------------------------------


def test_a_task_declared_with_fields_of_the_wrong_kind_stops_the_app_naming_the_field():
    """A class where an instance belongs (``output=Counts``) would otherwise fail every request of the task; it
    is refused when the task module is imported."""
    output_class = type(CLASSIFICATION)
    for kwargs, match in [
        (
            {"output": output_class},
            rf"its output must be an instance of OutputKind \(a class: write {output_class.__name__}\(\)\)",
        ),
        ({"input": type(TEXT)}, r"its input must be an instance of InputKind \(a class: write"),
        ({"input": "text"}, r"its input must be an instance of InputKind$"),
        ({"runtimes": (object, "x")}, "its runtimes must be classes, in a tuple or a list"),
        ({"runtimes": object}, "its runtimes must be classes, in a tuple or a list"),
        ({"parameters": dict}, "its parameters must be a pydantic model class, or None"),
    ]:
        with pytest.raises(TaskConfigError, match=match):
            Task(**{"name": "t", "input": TEXT, "output": CLASSIFICATION, "runtimes": (object,), **kwargs})
    assert Task("t", TEXT, CLASSIFICATION, runtimes=[object]).runtimes == (object,)  # a list is taken as a tuple


def test_a_registry_entry_may_name_a_class_of_a_task_module_or_of_the_module_defining_its_runtimes(fake_module):
    """The operator's modules are those of ``runtime_modules``, the task modules, and the modules their runtime
    classes come from (a task module may import them from another), each by its exact name."""
    from tests.text_stats_task import CountingRuntime

    fake_module(
        "tests_fake_task_module",
        TASK=Task("fake-counts", TEXT, CLASSIFICATION, runtimes=(CountingRuntime,)),
        Other=CountingRuntime,
    )
    catalog = TaskCatalog.load(["tests_fake_task_module"], runtime_modules=["tests"])
    assert catalog.check_runtime("tests_fake_task_module:Other") is None  # a class of the task module
    assert catalog.check_runtime("tests.text_stats_task:CountingRuntime") is None  # where its runtime is defined
    assert "is not in args.runtime_modules" in catalog.check_runtime("tests.byo_runtimes:Sized")  # not a prefix


class _OwnKind(type(ENTITIES)):
    """An output kind of one's own: its ``native`` and ``v2`` are not the app's, and get checked."""

    def __init__(self, native=None, v2=None) -> None:
        self._native, self._v2 = native, v2

    def native(self, wire, count):
        return self._native if self._native is not None else super().native(wire, count)

    def v2(self, wire):
        return self._v2 if self._v2 is not None else super().v2(wire)


def test_an_answer_no_protocol_could_write_fails_in_its_tasks_own_step_not_in_a_serializer():
    """A task's ``native`` must answer one prediction per input, of values JSON holds, and its ``v2`` the
    tensors its model metadata declares, of the datatypes declared: otherwise the step fails (a 503 naming the
    task and the step, below), where before a serializer failed after the request was counted a 200 and
    answered a 500."""
    from serve_app.core.outputs import native_answer, v2_tensors

    wire = ENTITIES.encode([[{"entity_group": "PER", "score": 0.9, "word": "Ann", "start": 0, "end": 3}]])
    assert native_answer(_OwnKind(), wire, 1) == ENTITIES.native(wire, 1)
    assert v2_tensors(_OwnKind(), wire).keys() == {spec.name for spec in ENTITIES.outputs()}
    assert native_answer(_OwnKind(native=({"a": 1},)), wire, 1) == [{"a": 1}]  # a tuple is taken as a list
    for kind, match in [
        (_OwnKind(native=[{"score": np.float32(0.9)}]), "native answered a value JSON cannot hold: .*numpy.float32"),
        (_OwnKind(native=[[], []]), "one prediction per input: 1 inputs, got 2 items"),
        (_OwnKind(native={"a": 1}), "one prediction per input: 1 inputs, got dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            native_answer(kind, wire, 1)
    some, datatype = "score", "FP32"
    assert {spec.name: spec.datatype for spec in ENTITIES.outputs()}[some] == datatype
    tensors = ENTITIES.v2(wire)
    for changed, match in [
        (
            {**tensors, some: tensors[some].astype(np.float64)},
            rf"v2 output '{some}' is FP64; the model metadata declares {datatype}",
        ),
        ({**tensors, some: np.array(["x"])}, "no v2 datatype holds numpy <U1"),
        ({**tensors, some: [1]}, f"v2 output '{some}' is a list, not a numpy array"),
        ({k: v for k, v in tensors.items() if k != some}, "v2 must answer the output tensors the metadata declares"),
    ]:
        with pytest.raises(ValueError, match=match):
            v2_tensors(_OwnKind(v2=changed), wire)


def test_every_shipped_output_kind_answers_within_its_own_metadata():
    from serve_app.core.outputs import native_answer, v2_tensors

    for kind, rows in [
        (CLASSIFICATION, [[("a", 0.75), ("b", 0.25)], [("b", 1.0), ("a", 0.0)]]),
        (EMBEDDING, [[0.6, 0.8], [1.0, 0.0]]),
        (ENTITIES, [[], [{"entity_group": "LOC", "score": 0.5, "word": "Paris", "start": 4, "end": 9}]]),
    ]:
        wire = kind.encode(rows)
        assert len(native_answer(kind, wire, 2)) == 2 and v2_tensors(kind, wire).keys() == kind.v2(wire).keys()


def test_a_kind_of_ones_own_that_subclasses_a_shipped_one_has_its_native_answer_checked():
    """The shipped kinds skip the JSON check, by their exact class: a subclass's ``encode`` may give arrays whose
    items the shipped ``native`` passes on as they are (numpy numbers in an object array)."""
    from serve_app.core.outputs import native_answer

    class NumpyLabels(type(CLASSIFICATION)):
        def encode(self, rows):
            wire = super().encode(rows)
            labels = np.empty(wire["labels"].shape, dtype=object)
            labels[...] = np.int64(7)  # label ids as numpy numbers
            return {**wire, "labels": labels}

    wire = NumpyLabels().encode([[("a", 1.0)]])
    with pytest.raises(ValueError, match="native answered a value JSON cannot hold"):
        native_answer(NumpyLabels(), wire, 1)


def test_a_tasks_own_step_that_raises_the_apps_base_error_or_a_contract_error_is_its_503_without_our_paths():
    """In the ingress's steps (decode, native, v2) the app's base error, a 500, and a ``ContractError`` are the
    task's own failure too; the worker's steps that read a runtime's answer leave a ContractError to their
    caller, which names the runtime. The project's paths are not shown to the client."""
    from serve_app.core.errors import InvalidInput, ModelFailed, ServeAppError
    from serve_app.core.outputs import output_code
    from serve_app.core.paths import PROJECT_ROOT

    raised = [
        (ServeAppError("the table is not ready"), "ServeAppError: the table is not ready"),
        (ContractError("no such label"), "ContractError: no such label"),
        (FileNotFoundError(f"{PROJECT_ROOT}/vocab/missing.txt"), "FileNotFoundError: vocab/missing.txt"),
    ]
    for error, reason in raised:
        with pytest.raises(ModelFailed) as e, output_code("m", "t", "shape its answer for the native API"):
            raise error
        assert e.value.status_code == 503
        assert e.value.message == f"Model 'm': its task 't' failed to shape its answer for the native API: {reason}"
    with pytest.raises(InvalidInput), output_code("m", "t", "decode its inputs"):
        raise InvalidInput("input_data[0]: refused")
    with pytest.raises(ContractError), output_code("m", "t", "encode its answer", runtime_answers=True):
        raise ContractError("a row is label scores")
    with output_code("m", "t", "decode its inputs"):
        pass  # nothing raised: nothing to say
