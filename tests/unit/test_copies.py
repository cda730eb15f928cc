"""One copy of a model on a replica (deployments/worker/copies.py): held while requests run on it, freed
when the last of them is done, taken back instead of loaded again, measured at load, and answering on one
thread of its own."""

import gc
import threading
import weakref

import numpy as np
import pytest

from deployments.runtimes import ModelRuntime, runtime_for
from deployments.worker.copies import ModelCopy, resident_bytes
from serve_app.core.outputs import ContractError
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import TaskCatalog


def copy_of(tiny_dir, model_id="gamma") -> ModelCopy:
    spec = ModelSpec(id=model_id, task="text-classification", source={"path": str(tiny_dir / model_id)})
    return ModelCopy(spec, runtime_for(spec, device="cpu"), TaskCatalog.load().task_of(spec))


def test_a_load_measures_the_weights_exactly_and_the_growth_of_resident_memory(tiny_dir):
    import torch

    copy = copy_of(tiny_dir).load()
    model = copy.runtime.pipeline.model
    exact = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert copy.weights_bytes == exact
    assert copy.rss_growth_bytes is not None and copy.rss_growth_bytes >= 0 and resident_bytes() > 0
    assert copy.size_bytes == max(exact, copy.rss_growth_bytes)  # what the budget counts: the larger
    assert isinstance(model, torch.nn.Module) and copy.load_seconds > 0


def test_a_runtime_that_cannot_tell_its_size_is_measured_by_resident_memory(tiny_dir):
    class Opaque(ModelRuntime):
        def load(self):
            self.blob = bytearray(8 << 20)  # 8 MiB that no framework reports

        def predict(self, inputs):
            return [[("x", 1.0)] for _ in inputs]

    spec = ModelSpec(id="o", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Opaque(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    assert copy.weights_bytes is None and copy.size_bytes == copy.rss_growth_bytes >= 8 << 20


def copy_telling_its_size(told) -> ModelCopy:
    """A copy of a runtime of one's own whose ``size_bytes()`` answers ``told``, not loaded yet."""

    class Sized(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            return [[("x", 1.0)] for _ in inputs]

        def size_bytes(self):
            return told

    spec = ModelSpec(id="s", task="text-classification", source={"path": "x"})
    return ModelCopy(spec, Sized(spec, "cpu"), TaskCatalog.load().task_of(spec))


@pytest.mark.parametrize(
    ("told", "counted"), [(np.int64(4096), 4096), (1234.5, 1235), (np.float32(8.0), 8), (None, None), (0, 0)]
)
def test_a_size_a_runtime_tells_as_a_number_is_counted_as_a_plain_int(told, counted):
    """The replica's report (JSON) and the router (whole bytes) carry it: a numpy integer or a float is taken."""
    copy = copy_telling_its_size(told).load()
    assert copy.weights_bytes == counted and (counted is None or type(copy.weights_bytes) is int)


@pytest.mark.parametrize("told", [-1, float("nan"), float("inf"), True, "4096", np.array([1, 2])])
def test_a_size_that_is_no_number_of_bytes_fails_the_load_saying_so(told):
    with pytest.raises(ContractError, match=r"size_bytes\(\) must answer a number of bytes"):
        copy_telling_its_size(told).load()


@pytest.mark.parametrize("kind", ["numpy", "torch", "bfloat16"])
def test_an_embedding_runtime_may_answer_one_array_of_a_row_per_input(kind):
    """``predict`` may return what an encoder returns: an array or a tensor, its first axis the inputs."""
    import numpy as np
    import torch

    class Encoder(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            vectors = np.arange(len(inputs) * 3, dtype=np.float32).reshape(len(inputs), 3)
            tensor = torch.from_numpy(vectors)
            return vectors if kind == "numpy" else tensor if kind == "torch" else tensor.to(torch.bfloat16)

    spec = ModelSpec(id="e", task="feature-extraction", source={"path": "x"})
    copy = ModelCopy(spec, Encoder(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    first, second = copy.answer([["a", "b"], ["c"]])
    assert first["embedding"].tolist() == [[0, 1, 2], [3, 4, 5]] and second["embedding"].tolist() == [[6, 7, 8]]


def test_an_unload_that_raises_still_drops_the_runtime_and_releases_the_copy():
    class Careless(ModelRuntime):
        def load(self):
            pass

        def unload(self):
            raise RuntimeError("already gone")

        def predict(self, inputs):
            return [[("x", 1.0)] for _ in inputs]

    spec = ModelSpec(id="c", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Careless(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    copy.free()
    assert not copy.loaded and copy.released.is_set()


def test_unload_drops_every_reference_to_the_weights(tiny_dir):
    copy = copy_of(tiny_dir, "beta").load()
    model_ref = weakref.ref(copy.runtime.pipeline.model)
    copy.__del__()  # what Ray Serve's LRU calls on eviction
    gc.collect()
    assert not copy.loaded and model_ref() is None, "the weights are still referenced after unload"
    with pytest.raises(RuntimeError, match="not loaded"):
        copy.answer([["hello"]])


def test_unload_during_a_request_waits_for_it(tiny_dir):
    copy = copy_of(tiny_dir).load()
    with copy.held():
        copy.unload()  # the LRU evicts it while a request holds it
        assert copy.loaded
        (answer,) = copy.answer([["still answered"]])
        assert answer["labels"][0, 0].startswith("gamma-")
    assert not copy.loaded  # released when the request finished


def test_a_copy_evicted_while_in_use_is_taken_back_instead_of_loaded_again(tiny_dir):
    copy = copy_of(tiny_dir, "delta").load()
    told = []
    copy.on_unload = told.append
    with copy.held():
        assert copy.unload() is True  # the LRU evicts it while a request holds it: the free waits
        assert told == [True]
        copy.__del__ = lambda _: None  # what Serve's LRU does to the model it evicted
        assert copy.revive() and copy.loaded  # a new request wants it before the free: taken back
    assert copy.loaded  # the request finished, and the revived copy stays
    model_ref = weakref.ref(copy.runtime.pipeline.model)
    copy.__del__()  # the next eviction runs the real __del__, not Serve's no-op
    gc.collect()
    assert not copy.loaded and model_ref() is None
    assert not copy.revive()  # freed: nothing to take back


def test_a_copy_freed_when_its_last_request_ended_cannot_be_revived(tiny_dir):
    copy = copy_of(tiny_dir, "delta").load()
    with copy.held():
        copy.unload()
    assert not copy.revive()


def test_answers_are_split_per_request_and_encoded_by_the_task(tiny_dir):
    copy = copy_of(tiny_dir, "alpha").load()
    first, second = copy.answer([["hello", "bad"], ["win a free iphone now"]])
    assert first["labels"].shape == (2, 2) and second["scores"].shape == (1, 2)
    assert second["scores"].dtype == np.float32


def prompted_copy(calls: list, row) -> ModelCopy:
    """A loaded feature-extraction copy whose runtime takes ``prompt_name``, records each call's inputs and
    prompt in ``calls``, and answers ``row(prompt_name)`` for each input."""

    class Prompted(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs, prompt_name=None):
            calls.append((list(inputs), prompt_name))
            return [row(prompt_name) for _ in inputs]

    spec = ModelSpec(id="e", task="feature-extraction", source={"path": "x"})
    return ModelCopy(spec, Prompted(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()


def test_requests_of_a_batch_with_other_parameters_get_a_model_call_each_in_request_order():
    calls = []
    copy = prompted_copy(calls, lambda prompt_name: np.full(2, len(prompt_name or ""), dtype=np.float32))
    given = [{"prompt_name": "query"}, None, {"prompt_name": "query"}, {"prompt_name": "doc"}]
    answers = copy.answer([["a"], ["b", "c"], ["d"], ["e"]], parameters=given)
    assert calls == [(["a", "d"], "query"), (["b", "c"], None), (["e"], "doc")]
    assert [a["embedding"][:, 0].tolist() for a in answers] == [[5], [0, 0], [5], [3]]


def test_top_k_is_applied_to_each_requests_answer_and_never_reaches_the_runtime_nor_splits_its_call():
    """Classification's top_k is the output kind's: a runtime of one's own that knows nothing of it serves it,
    in one model call for requests with and without it."""
    calls = []

    class Scores(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            calls.append(list(inputs))
            return [{"a": 0.1, "b": 0.6, "c": 0.3} for _ in inputs]

    spec = ModelSpec(id="s", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Scores(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    answers = copy.answer([["x"], ["y", "z"], ["w"]], parameters=[{"top_k": 1}, None, {"top_k": 2}])
    assert calls == [["x", "y", "z", "w"]]
    assert [a["labels"].tolist() for a in answers] == [[["b"]], [["b", "c", "a"]] * 2, [["b", "c"]]]
    assert [a["scores"].shape for a in answers] == [(1, 1), (2, 3), (1, 2)]


def test_dimensions_reach_no_runtime_and_a_prompt_still_does():
    calls = []
    copy = prompted_copy(calls, lambda prompt_name: np.arange(4, dtype=np.float32))
    given = [{"prompt_name": "q", "dimensions": 2}, {"prompt_name": "q"}]
    short, whole = copy.answer([["a"], ["b"]], parameters=given)
    assert calls == [(["a", "b"], "q")]
    assert short["embedding"].tolist() == [[0.0, 1.0]] and whole["embedding"].tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_a_request_at_fault_gets_its_error_and_the_rest_of_its_batch_its_answers():
    """A prompt the model has not fails its own requests (a 422), not the batch; and a runtime of one's own
    whose predict does not take its task's parameters answers a request that gives one with a 422."""
    from serve_app.core.errors import InvalidInput

    class Prompted(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs, prompt_name=None):
            if prompt_name == "nope":
                raise InvalidInput("parameters.prompt_name: no prompt 'nope'", field="parameters.prompt_name")
            return [np.ones(2, dtype=np.float32) for _ in inputs]

    class Plain(Prompted):
        def predict(self, inputs):
            return [np.ones(2, dtype=np.float32) for _ in inputs]

    spec = ModelSpec(id="e", task="feature-extraction", source={"path": "x"})
    task = TaskCatalog.load().task_of(spec)
    copy = ModelCopy(spec, Prompted(spec, "cpu"), task).load()
    good, bad, plain = copy.answer(
        [["a"], ["b"], ["c"]], parameters=[{"prompt_name": "q"}, {"prompt_name": "nope"}, None]
    )
    assert good["embedding"].shape == (1, 2) and plain["embedding"].shape == (1, 2)
    assert isinstance(bad, InvalidInput) and "no prompt 'nope'" in str(bad)
    (refused,) = ModelCopy(spec, Plain(spec, "cpu"), task).load().answer([["a"]], parameters=[{"prompt_name": "q"}])
    assert isinstance(refused, InvalidInput) and "model 'e' takes no prompt_name" in str(refused)


def test_an_input_its_runtime_refuses_fails_only_its_own_request_and_each_error_is_its_own():
    """A runtime of one's own may refuse one input with the app's error: the requests of the same parameters
    that shared its call are answered by calls of their own, and only the one at fault gets an error."""
    from serve_app.core.errors import InvalidInput

    calls = []

    class Picky(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            calls.append(list(inputs))
            if "bad" in inputs:
                raise InvalidInput("input_data: 'bad' is refused", field="input_data")
            return [[("x", 1.0)] for _ in inputs]

    spec = ModelSpec(id="p", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Picky(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    good, bad, fine, worse = copy.answer([["good"], ["bad"], ["fine", "ok"], ["bad"]])
    assert good["labels"].shape == (1, 1) and fine["labels"].shape == (2, 1)
    assert isinstance(bad, InvalidInput) and isinstance(worse, InvalidInput) and bad is not worse
    assert calls == [["good", "bad", "fine", "ok", "bad"], ["good"], ["bad"], ["fine", "ok"], ["bad"]]
    # A parameter the runtime does not take refuses each of its requests, with an error each, and runs none.
    calls.clear()
    one, other = copy.answer([["a"], ["b"]], parameters=[{"temperature": 2}, {"temperature": 2}])
    assert isinstance(one, InvalidInput) and isinstance(other, InvalidInput) and one is not other
    assert calls == []


def test_a_runtime_that_answers_outside_its_task_is_a_contract_error():
    class Wrong(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            rows = ["not label scores" for _ in inputs]
            return rows[:-1] if len(inputs) == 2 else rows  # two inputs: one row short; else the wrong form

    spec = ModelSpec(id="w", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Wrong(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    with pytest.raises(ContractError, match="one row per input: 2 inputs, got 1"):
        copy.answer([["a"], ["b"]])
    with pytest.raises(ContractError, match="label scores, not str"):
        copy.answer([["a", "b", "c"]])


def test_each_copy_runs_on_one_thread_of_its_own_until_it_is_freed(tiny_dir):
    """A copy's batches all run on the same thread (its allocator arena and torch state stay the same), not
    on another copy's (two models' batches can run at once); freeing a copy ends its thread, and so does
    freeing a copy that was unloaded by other means."""
    first, second = copy_of(tiny_dir, "alpha").load(), copy_of(tiny_dir, "beta").load()
    seen = {first: set(), second: set()}
    for copy, threads in seen.items():
        for _ in range(3):
            copy.thread.submit(lambda threads=threads: threads.add(threading.current_thread())).result()
    (one,), (other,) = seen[first], seen[second]
    assert one is not other and one is not threading.main_thread()
    first.free()
    one.join(5)
    assert not one.is_alive() and other.is_alive()
    second.mark_unloaded()
    second._runtime.unload()  # the weights dropped by other means than free: a free still ends the thread
    second.free()
    other.join(5)
    assert not other.is_alive()


def test_a_forward_pass_with_more_threads_runs_with_them_and_the_count_is_undone(tiny_dir):
    """On the copy's own thread, just before its forward pass: the thread's torch count is the hint's during
    the pass, and what it was before after it, whatever the pass raised."""
    import torch

    copy = copy_of(tiny_dir, "alpha").load()
    seen = []
    predict = copy.runtime.predict

    def recording(inputs):
        seen.append(torch.get_num_threads())
        return predict(inputs)

    copy.runtime.predict = recording

    def on_thread(threads):
        before = torch.get_num_threads()
        copy.answer([["hello"]], threads=threads)
        return before, torch.get_num_threads()

    one = copy.thread.submit(torch.set_num_threads, 1).result()
    assert one is None
    assert copy.thread.submit(on_thread, 2).result() == (1, 1) and seen == [2]
    assert copy.thread.submit(on_thread, None).result() == (1, 1) and seen == [2, 1]

    def failing(inputs):
        raise ValueError("boom")

    copy.runtime.predict = failing
    with pytest.raises(ValueError):
        copy.thread.submit(copy.answer, [["x"]], 2).result()
    assert copy.thread.submit(torch.get_num_threads).result() == 1


def test_a_tasks_own_code_that_raises_fails_the_request_naming_the_task_and_the_step():
    """A task module's output kind is its own code: its ``encode`` raising is a 503 (ModelFailed) that names the
    task and the step, for each request of the batch alone; a ContractError is still the runtime's fault."""
    from serve_app.core.errors import ModelFailed
    from tests.faulty_task import ENCODE_FAILS, TASK, FaultyRuntime

    calls = []

    class Counted(FaultyRuntime):
        def predict(self, inputs):
            calls.append(list(inputs))
            return super().predict(inputs)

    entry = {"id": "f", "task": TASK.name, "source": {"path": "models/f"}}
    spec = ModelSpec.model_validate(entry, context={"catalog": TaskCatalog.load(["tests.faulty_task"])})
    copy = ModelCopy(spec, Counted(spec, "cpu"), TASK).load()
    failed, fine, also = copy.answer([[ENCODE_FAILS], ["two words"], ["one"]])
    assert isinstance(failed, ModelFailed) and failed.status_code == 503
    assert str(failed) == "Model 'f': its task 'faulty-statistics' failed to encode its answer: KeyError: 'chars'"
    assert fine["words"].tolist() == [2] and also["words"].tolist() == [1]
    assert calls == [[ENCODE_FAILS, "two words", "one"]]  # the model ran once: the task's failure is the request's


def test_the_apps_base_error_raised_by_a_model_is_its_503_and_the_errors_of_a_status_keep_it():
    """``ServeAppError`` itself is a 500, the app's own fault: raised by a model's code (its ``predict`` or its
    ``prepare``) it is the model's failure, a 503 naming it; ``InvalidInput`` and the like keep their status."""
    from deployments.worker.batching import model_failure
    from serve_app.core.errors import InvalidInput, ModelFailed, ServeAppError

    class Raises(ModelRuntime):
        def load(self):
            pass

        def predict(self, inputs):
            if "base" in inputs:
                raise ServeAppError("the scorer is not ready")
            raise InvalidInput("input_data[0]: refused", field="input_data[0]")

    spec = ModelSpec(id="r", task="text-classification", source={"path": "x"})
    copy = ModelCopy(spec, Raises(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    base, refused = copy.answer([["base"], ["other"]])
    assert isinstance(base, ModelFailed) and base.status_code == 503
    assert base.message == "Model 'r' failed on this input: ServeAppError: the scorer is not ready"
    assert isinstance(refused, InvalidInput) and refused.status_code == 422
    prepared = model_failure(copy, ServeAppError("no such file"), "failed to prepare this input")
    assert isinstance(prepared, ModelFailed) and prepared.message.startswith("Model 'r' failed to prepare this input:")
    assert model_failure(copy, refused) is refused
