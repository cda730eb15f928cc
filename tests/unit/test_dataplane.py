"""The data plane's pure logic: one state per model from what the replicas report, and the status a
failed request is recorded with."""

import asyncio

import grpc
import pytest
from ray.exceptions import RayTaskError

from deployments.ingress.dataplane import CLIENT_CLOSED, InferenceRequest, merge_model_status, status_of
from serve_app.core.errors import ModelNotFound, RequestTimeout
from serve_app.core.outputs import CLASSIFICATION
from serve_app.core.registry import ModelSpec
from serve_app.core.schemas import ModelState, ReplicaModelStatus, ReplicaStatus, WorkerResult

SPEC = ModelSpec(id="m", task="text-classification", source={"path": "models/m"})


def replica(replica_id: str, **status) -> ReplicaStatus:
    return ReplicaStatus(replica_id=replica_id, models={"m": ReplicaModelStatus(**status)} if status else {})


def test_a_model_no_replica_has_seen_is_not_loaded():
    status = merge_model_status(SPEC, [replica("r1"), replica("r2")])
    assert status.state is ModelState.NOT_LOADED and not status.loaded
    assert status.replicas == [] and status.load_count == 0 and status.last_error is None


def test_loaded_on_any_replica_is_loaded_and_counts_add_up():
    status = merge_model_status(
        SPEC,
        [
            replica(
                "r1",
                state="loaded",
                load_count=2,
                unload_count=1,
                last_loaded_at=20,
                last_load_seconds=0.5,
                last_used_at=30,
            ),
            replica(
                "r2",
                state="not_loaded",
                load_count=1,
                unload_count=1,
                last_loaded_at=10,
                last_load_seconds=0.9,
                last_used_at=35,
            ),
        ],
    )
    assert status.state is ModelState.LOADED and status.loaded and status.replicas == ["r1"]
    assert (status.load_count, status.unload_count) == (3, 2)
    assert status.last_loaded_at == 20 and status.last_load_seconds == 0.5  # the newest load's
    assert status.last_used_at == 35


def test_requests_a_loaded_models_code_failed_add_up_and_the_newest_message_is_shown():
    status = merge_model_status(
        SPEC,
        [
            replica("r1", state="loaded", request_failures=2, last_request_error="old", last_request_error_at=10),
            replica("r2", state="loaded", request_failures=1, last_request_error="new", last_request_error_at=20),
        ],
    )
    assert status.state is ModelState.LOADED  # it loads; its requests fail: a state of its own would hide that
    assert (status.request_failures, status.last_request_error) == (3, "new")


def test_loading_anywhere_is_loading_when_no_replica_holds_it():
    status = merge_model_status(SPEC, [replica("r1", state="loading"), replica("r2", state="not_loaded")])
    assert status.state is ModelState.LOADING and status.replicas == []


def test_a_failed_load_newer_than_the_last_success_is_failed():
    failed = merge_model_status(
        SPEC, [replica("r1", state="failed", last_error="OSError: gone", last_error_at=50, last_loaded_at=40)]
    )
    assert failed.state is ModelState.FAILED and failed.last_error == "OSError: gone"
    recovered = merge_model_status(
        SPEC,
        [
            replica("r1", state="failed", last_error="x", last_error_at=50),
            replica("r2", state="not_loaded", last_loaded_at=60),
        ],
    )
    assert recovered.state is ModelState.NOT_LOADED


def test_the_status_a_failed_request_is_recorded_with():
    assert status_of(ModelNotFound("x", ["m"])) == 404
    assert status_of(RequestTimeout("slow")) == 504
    assert status_of(asyncio.CancelledError()) == CLIENT_CLOSED == 499  # the client went away: not a 500
    wrapped = RayTaskError("predict", "traceback", ModelNotFound("x", ["m"]))
    assert status_of(wrapped) == 404
    assert status_of(RuntimeError("boom")) == 500
    # A /predict body that does not validate: recorded as the 422 FastAPI answers, not as a server error.
    from deployments.ingress.protocols.native import parse_predict_request

    with pytest.raises(Exception) as bad:
        parse_predict_request(b'{"model_id": "ok"}', max_items=4)
    assert status_of(bad.value) == 422


NEVER = object()
"""The outcome of a worker call that never answers."""


class FakeResponse:
    def __init__(self, outcome):
        self._outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        if self._outcome is NEVER:  # a replica that does not answer (until the call is cancelled)
            await asyncio.Event().wait()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self):
        self.cancelled = True


class FakeWorker:
    """A DeploymentHandle that answers each call with the next scripted outcome."""

    app_name, deployment_name = "app", "ModelWorker"

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, str]] = []
        self.kwargs: list[dict] = []
        self.responses: list[FakeResponse] = []
        self._model = None

    def options(self, multiplexed_model_id):
        self._model = multiplexed_model_id
        return self

    def __getattr__(self, method):
        worker = self

        class _Method:
            def remote(self, *args, **kwargs):
                worker.calls.append((method, worker._model))
                worker.kwargs.append(kwargs)
                worker.responses.append(FakeResponse(worker.outcomes.pop(0)))
                return worker.responses[-1]

        return _Method()


class FakeMetrics:
    def __init__(self):
        self.observed: list[tuple[str, str, int]] = []

    def observe(self, model_id, task, api, status, seconds):
        self.observed.append((model_id, task, api, status))


def plane(*outcomes, timeout_s=30.0):
    from deployments.ingress.dataplane import DataPlane
    from serve_app.core.config import AppArgs
    from tests.helpers import live_registry

    metrics, worker = FakeMetrics(), FakeWorker(*outcomes)
    args = AppArgs(request_timeout_s=timeout_s, auth={"mode": "off"})
    return DataPlane(live_registry(SPEC), worker, args, metrics=metrics, replicas=FakeReplicas()), worker, metrics


class FakeReplicas:
    """The ingress's directory of worker replicas, as the data plane's inference uses it."""

    def __init__(self):
        self.changes = 0

    def changed(self):
        self.changes += 1


ANSWER = WorkerResult(outputs=CLASSIFICATION.encode([[("a", 0.75), ("b", 0.25)]]))
PREDICTIONS = [{"label": "a", "score": 0.75, "scores": [{"label": "a", "score": 0.75}, {"label": "b", "score": 0.25}]}]


def test_infer_dispatches_to_the_model_and_records_the_request():
    p, worker, metrics = plane(ANSWER)
    result = asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert result.spec == SPEC and result.task.name == "text-classification" and result.native() == PREDICTIONS
    assert worker.calls == [("predict", "m")]
    # the worker learns what the inputs were decoded for, under which registry
    assert worker.kwargs == [
        {
            "task": "text-classification",
            "registry_version": p.live.version,
            "registry_applied_at": p.live.applied_at,
            "declared_bytes": None,
        }
    ]
    assert metrics.observed == [("m", "text-classification", "native", 200)]


def test_a_request_that_loaded_its_model_or_failed_to_makes_the_next_listing_ask_the_replicas():
    """GET /models and v2 readiness follow a load at once: the directory's snapshot is dropped when a request
    loaded its model, or got a 503 (a failed load, most likely), and kept when the model was loaded already."""
    from serve_app.core.errors import ModelUnavailable

    p, _, _ = plane(ANSWER, WorkerResult(outputs=ANSWER.outputs, loaded=True), ModelUnavailable("no files"))
    asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert p.replicas.changes == 0
    asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert p.replicas.changes == 1
    with pytest.raises(ModelUnavailable):
        asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert p.replicas.changes == 2


def test_an_unknown_model_is_recorded_under_one_tag_never_the_requested_id():
    p, worker, metrics = plane()
    with pytest.raises(ModelNotFound):
        asyncio.run(p.infer("../../etc", InferenceRequest(["hello"]), api="v2"))
    assert worker.calls == [] and metrics.observed == [("(unknown)", "(unknown)", "v2", 404)]


def test_an_output_the_models_task_has_not_is_refused_before_the_model_runs():
    from serve_app.core.errors import InvalidInput

    p, worker, metrics = plane(ANSWER)
    with pytest.raises(InvalidInput, match=r"unknown output\(s\): probabilities; this model has label, score"):
        asyncio.run(p.infer("m", InferenceRequest(["hello"], outputs=["label", "probabilities"]), api="v2"))
    assert worker.calls == [] and metrics.observed == [("m", "text-classification", "v2", 422)]
    assert asyncio.run(p.infer("m", InferenceRequest(["hello"], outputs=["score"]), api="v2")).native() == PREDICTIONS


def test_inputs_parsed_from_the_body_are_parsed_after_the_lookup():
    p, _, _ = plane(ANSWER)
    parsed = []

    def parser(mark):
        async def parse():
            parsed.append(mark)
            return InferenceRequest(["hi"])

        return parse

    asyncio.run(p.infer("m", parser(1), api="v2"))
    assert parsed == [1]
    with pytest.raises(ModelNotFound):
        asyncio.run(p.infer("nope", parser(2), api="v2"))
    assert parsed == [1]  # never parsed for an unknown model


def test_a_replica_that_dies_under_a_request_is_retried_once():
    from ray.exceptions import ActorDiedError

    p, worker, metrics = plane(ActorDiedError(), ANSWER)
    assert asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native")).native() == PREDICTIONS
    assert worker.calls == [("predict", "m")] * 2 and metrics.observed == [("m", "text-classification", "native", 200)]


def test_a_replica_lost_over_grpc_is_retried_and_after_three_losses_the_answer_is_a_clean_503():
    from ray.exceptions import ActorDiedError

    from deployments.ingress.dataplane import ATTEMPTS
    from serve_app.core.errors import ModelUnavailable

    lost = grpc_error(grpc.StatusCode.UNKNOWN)  # a replica killed mid-call, over Serve's gRPC transport
    p, worker, metrics = plane(lost, ActorDiedError(), ANSWER)
    assert asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native")).native() == PREDICTIONS
    p, worker, metrics = plane(*[ActorDiedError()] * ATTEMPTS)
    with pytest.raises(ModelUnavailable, match="died"):
        asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert len(worker.calls) == ATTEMPTS == 3 and metrics.observed == [("m", "text-classification", "native", 503)]


def test_other_transport_errors_are_not_retried():
    p, worker, _ = plane(grpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert len(worker.calls) == 1


def grpc_error(code):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="stream reset")


def test_an_application_error_from_the_worker_is_not_retried():
    from serve_app.core.errors import BadImage

    p, worker, metrics = plane(RayTaskError("predict", "tb", BadImage("bad")))
    with pytest.raises(BadImage):
        asyncio.run(p.infer("m", InferenceRequest(["x"]), api="native"))
    assert len(worker.calls) == 1 and metrics.observed == [("m", "text-classification", "native", 400)]


def test_the_error_of_a_request_for_a_registered_model_names_it_whichever_step_refused_it():
    """Refused by the ingress's own checks (an output the task has not) or by the worker (its runtime's 422):
    the body names the model. An unknown model's 404 names the id asked for, as before."""
    from serve_app.core.errors import InvalidInput

    p, _, _ = plane(RayTaskError("predict", "tb", InvalidInput("input_data[0]: too short", field="input_data")))
    with pytest.raises(InvalidInput) as ingress:
        asyncio.run(p.infer("m", InferenceRequest(["x"], outputs=["probabilities"]), api="v2"))
    with pytest.raises(InvalidInput) as worker:
        asyncio.run(p.infer("m", InferenceRequest(["x"]), api="native"))
    assert ingress.value.body()["model_id"] == "m" and ingress.value.body()["field"] == "outputs"
    assert worker.value.body() == {
        "error": "invalid_input",
        "message": "input_data[0]: too short",
        "field": "input_data",
        "model_id": "m",
    }
    with pytest.raises(ModelNotFound) as unknown:
        asyncio.run(p.infer("x" * 100, InferenceRequest(["x"]), api="native"))
    assert unknown.value.body()["model_id"] == "x" * 80 + "..."


def test_a_client_deadline_shorter_than_the_configured_timeout_applies():
    p, worker, metrics = plane(NEVER, timeout_s=30.0)
    with pytest.raises(RequestTimeout, match=r"within 0\.05s"):
        asyncio.run(p.infer("m", InferenceRequest(["hello"], timeout_s=0.05), api="v2"))
    assert worker.responses[0].cancelled and metrics.observed == [("m", "text-classification", "v2", 504)]
    p, _, _ = plane(NEVER, timeout_s=0.05)
    with pytest.raises(RequestTimeout, match=r"within 0\.05s"):  # a longer client deadline does not extend it
        asyncio.run(p.infer("m", InferenceRequest(["hello"], timeout_s=60.0), api="v2"))


def test_a_request_over_the_timeout_is_504_and_its_work_on_the_replica_is_cancelled():
    p, worker, metrics = plane(NEVER, timeout_s=0.05)
    with pytest.raises(RequestTimeout, match=r"0\.05s"):
        asyncio.run(p.infer("m", InferenceRequest(["hello"]), api="native"))
    assert worker.responses[0].cancelled
    assert metrics.observed == [("m", "text-classification", "native", 504)]


def test_a_client_that_goes_away_is_recorded_as_499_and_its_work_is_cancelled():
    p, worker, metrics = plane(NEVER)

    async def leave():
        task = asyncio.ensure_future(p.infer("m", InferenceRequest(["hello"]), api="native"))
        while not worker.responses:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert worker.responses[0].cancelled
    assert metrics.observed == [("m", "text-classification", "native", CLIENT_CLOSED)]


class Holders(FakeReplicas):
    """The directory of worker replicas for an unload: ``answers`` says how each replica answers it (True, or an
    exception; NEVER: it does not answer)."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.timeouts = answers, []

    async def statuses(self, fresh=False):
        return [replica(rid, state="loaded") for rid in self.answers]

    async def unload(self, model_id, replica_id, timeout_s):
        self.timeouts.append(timeout_s)
        answer = self.answers[replica_id]
        if answer is NEVER:
            await asyncio.wait_for(asyncio.Event().wait(), 0.01)  # its deadline passes
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_an_unload_a_holder_does_not_confirm_is_a_503_naming_it_and_the_next_listing_asks_again():
    """A replica loading a model unloads once that load is done (Serve's one lock over both), so each holder
    has the request's timeout; a holder that does not confirm in time is named in a 503, not a 500, and the
    others' unloads stand."""
    from serve_app.core.errors import ModelUnavailable

    p, _, _ = plane(timeout_s=42.0)
    p.replicas = Holders({"r1": True, "r2": NEVER})
    with pytest.raises(ModelUnavailable, match=r"1 of the 2 worker replicas that held it did not confirm") as e:
        asyncio.run(p.unload("m"))
    assert "r2: no answer within 42s" in e.value.message and "r1" not in e.value.message and e.value.status_code == 503
    assert p.replicas.timeouts == [42.0, 42.0] and p.replicas.changes == 1
    p.replicas = Holders({"r1": True, "r2": True})
    assert asyncio.run(p.unload("m")).spec == SPEC and p.replicas.changes == 1


def test_an_unload_whose_holder_stopped_before_it_answered_stands_and_another_error_is_named():
    """A holder killed just before or during the unload: the router would hold the call (sent to it by name)
    until the timeout; it is given up as soon as the replica leaves the running ones, and its copy went with
    it, so the unload stands. An unload refused at once is named by its error, not as a timeout."""
    from deployments.ingress.replicas import ReplicaGone
    from serve_app.core.errors import ModelUnavailable

    p, _, _ = plane(timeout_s=42.0)
    p.replicas = Holders({"r1": True, "r2": ReplicaGone("r2")})
    assert asyncio.run(p.unload("m")).spec == SPEC
    p.replicas = Holders({"r1": ConnectionError("refused")})
    with pytest.raises(ModelUnavailable, match=r"did not confirm its unload \(r1: ConnectionError\)"):
        asyncio.run(p.unload("m"))


def test_a_failed_explicit_load_makes_the_next_listing_ask_the_replicas():
    from serve_app.core.errors import ModelUnavailable

    p, _, _ = plane(ModelUnavailable("Model 'm' could not be loaded", model_id="m"))
    with pytest.raises(ModelUnavailable):
        asyncio.run(p.load("m"))
    assert p.replicas.changes == 1


def test_a_body_that_cannot_be_parsed_is_counted_under_the_unknown_model():
    from serve_app.core.errors import InvalidInput

    p, worker, metrics = plane()

    async def bad_body():
        raise InvalidInput("input_data: too many inputs", field="input_data")

    with pytest.raises(InvalidInput):
        asyncio.run(p.parsed("native", bad_body()))
    assert worker.calls == [] and metrics.observed == [("(unknown)", "(unknown)", "native", 422)]


def test_no_listed_worker_replica_has_confirmed_the_registry():
    from deployments.ingress.dataplane import ModelListing

    live = live_registry_of(SPEC)
    none = ModelListing(models=[], replicas=[], registry=live.status())
    assert not none.on_every_replica
    confirmed = replica("r1").model_copy(update={"registry": live.status()})
    assert ModelListing(models=[], replicas=[confirmed], registry=live.status()).on_every_replica


def live_registry_of(*specs):
    from tests.helpers import live_registry

    return live_registry(*specs)


def test_a_tasks_own_shaping_of_an_answer_that_raises_is_a_503_naming_the_task_and_the_step():
    """The native form and the v2 tensors come from the task's output kind, in the ingress: a task of one's own
    that raises there fails the request with a 503 (ModelFailed) naming it, never a 500."""
    from deployments.ingress.dataplane import InferenceResult
    from serve_app.core.errors import ModelFailed
    from tests.faulty_task import NATIVE_FAILS, TASK

    spec = SPEC.model_copy(update={"task": TASK.name})  # checked against the shipped tasks when SPEC was made
    failing = InferenceResult(spec, TASK, TASK.output.encode([{"chars": len(NATIVE_FAILS), "words": 3}]), 1)
    with pytest.raises(ModelFailed) as e:
        failing.native()
    assert e.value.status_code == 503 and str(e.value) == (
        "Model 'm': its task 'faulty-statistics' failed to shape its answer for the native API: "
        "RuntimeError: no native form for this answer"
    )
    assert failing.v2()["chars"].tolist() == [len(NATIVE_FAILS)]
    fine = InferenceResult(spec, TASK, TASK.output.encode([{"chars": 9, "words": 2}]), 1)
    assert fine.native() == [{"chars": 9, "words": 2}]


def faulty_plane(*rows: dict):
    """A data plane of one model, ``f``, of the tests' faulty task (tests/faulty_task.py), whose worker answers
    each of ``rows`` in turn, encoded by the task; and its metrics."""
    from deployments.ingress.dataplane import DataPlane
    from serve_app.core.config import SHIPPED_TASKS, AppArgs
    from serve_app.core.live_registry import LiveRegistry, registry_user_config
    from serve_app.core.tasks import TaskCatalog
    from tests.faulty_task import TASK

    live = LiveRegistry(TaskCatalog.load([*SHIPPED_TASKS, "tests.faulty_task"]))
    entry = {"id": "f", "task": TASK.name, "source": {"path": "models/f"}}
    live.apply(registry_user_config({"models": [entry]}, origin="test"))
    metrics = FakeMetrics()
    worker = FakeWorker(*(WorkerResult(outputs=TASK.output.encode([row])) for row in rows))
    return DataPlane(live, worker, AppArgs(auth={"mode": "off"}), metrics=metrics, replicas=FakeReplicas()), metrics


def test_a_request_whose_answer_its_task_fails_to_shape_is_recorded_as_the_503_it_gets():
    from serve_app.core.errors import ModelFailed
    from tests.faulty_task import NATIVE_FAILS, TASK

    answer = {"chars": len(NATIVE_FAILS), "words": 3}
    p, metrics = faulty_plane(answer, answer)
    with pytest.raises(ModelFailed, match="failed to shape its answer for the native API"):
        asyncio.run(p.infer("f", InferenceRequest([NATIVE_FAILS]), api="native"))
    assert asyncio.run(p.infer("f", InferenceRequest([NATIVE_FAILS]), api="v2")).v2()["words"].tolist() == [3]
    assert metrics.observed == [("f", TASK.name, "native", 503), ("f", TASK.name, "v2", 200)]


def test_an_answer_its_task_shapes_into_what_no_protocol_writes_is_the_503_of_that_step():
    """A task's native form of numpy numbers, or v2 tensors of another datatype than its metadata declares,
    fails in the task's own step, recorded as the 503 it is; before, a serializer failed after the request was
    counted a 200, and the client got a 500."""
    from serve_app.core.errors import ModelFailed
    from tests.faulty_task import FLOAT_COUNTS, NUMPY_NATIVE

    numpy_native, floats = {"chars": len(NUMPY_NATIVE), "words": 4}, {"chars": len(FLOAT_COUNTS), "words": 5}
    p, metrics = faulty_plane(numpy_native, numpy_native, floats, floats)
    failed = "Model 'f': its task 'faulty-statistics' failed to"
    with pytest.raises(ModelFailed) as e:
        asyncio.run(p.infer("f", InferenceRequest([NUMPY_NATIVE]), api="native"))
    assert str(e.value).startswith(f"{failed} shape its answer for the native API: ValueError: native answered a")
    assert asyncio.run(p.infer("f", InferenceRequest([NUMPY_NATIVE]), api="v2")).v2()["chars"].tolist() == [31]
    with pytest.raises(ModelFailed) as e:
        asyncio.run(p.infer("f", InferenceRequest([FLOAT_COUNTS]), api="v2"))
    assert str(e.value) == (
        f"{failed} shape its answer as v2 output tensors: "
        "ValueError: v2 output 'chars' is FP64; the model metadata declares INT64"
    )
    assert asyncio.run(p.infer("f", InferenceRequest([FLOAT_COUNTS]), api="native")).native() == [
        {"chars": 28.0, "words": 5.0}
    ]
    assert [status for *_, status in metrics.observed] == [503, 200, 503, 200]


def test_an_input_kind_that_raises_is_the_503_of_its_tasks_decode_step():
    """A task module's input kind is its own code too: an exception other than the app's errors is a 503
    naming the task and the step, never a 500; the app's own errors keep their status."""
    from serve_app.core.errors import InvalidInput, ModelFailed

    p, worker, metrics = plane()

    async def decode(kind, inputs):
        if inputs == ["refused"]:
            raise InvalidInput("input_data[0]: refused", field="input_data[0]")
        raise TypeError("'NoneType' object is not subscriptable")

    p.decoder.decode = decode
    with pytest.raises(ModelFailed) as e:
        asyncio.run(p.infer("m", InferenceRequest(["x"]), api="native"))
    assert str(e.value) == (
        "Model 'm': its task 'text-classification' failed to decode its inputs: "
        "TypeError: 'NoneType' object is not subscriptable"
    )
    with pytest.raises(InvalidInput):
        asyncio.run(p.infer("m", InferenceRequest(["refused"]), api="native"))
    assert worker.calls == [] and [status for *_, status in metrics.observed] == [503, 422]
