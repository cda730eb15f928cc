"""What the app writes to its logs, and what it never does (docs/operations.md, docs/configuration.md): a
warning at start-up when auth is off; no request body and no model file path. Read from this session's Ray
log files, once the lines a test waits for are in them (the replicas write their logs within a second)."""

import re
import uuid
from pathlib import Path

import pytest

from tests.helpers import replica_pids, wait_for

pytestmark = pytest.mark.integration

AUTH_OFF = "auth is off (auth.mode: off): anyone who can reach this app may predict, load and unload models"


def _logs() -> Path:
    from serve_app.core import ray_internals

    return ray_internals.logs_dir()


def _replica_log(app: str, deployment: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (_logs() / "serve").glob(f"replica_{app}_{deployment}_*.log"))


def test_with_auth_off_the_ingress_warns_at_start_up_and_with_auth_on_it_does_not(mixed_url, limits_url):
    """'mixed' runs with auth off, 'limits' with its keys: each ingress replica says so as it starts."""
    assert wait_for(lambda: "ingress started, auth off" in _replica_log("mixed", "Ingress"))
    assert AUTH_OFF in _replica_log("mixed", "Ingress")
    assert wait_for(lambda: "ingress started, auth api_key" in _replica_log("limits", "Ingress"))
    assert "auth is off" not in _replica_log("limits", "Ingress")  # logged before 'ingress started', if at all


def _search(*needles: str, files: list[Path] | None = None) -> dict[str, list[str]]:
    """The log files of this Ray session (or ``files``) that hold each needle."""
    found: dict[str, list[str]] = {n: [] for n in needles}
    for path in files if files is not None else _logs().rglob("*"):
        try:
            text = path.read_bytes()
        except (IsADirectoryError, PermissionError, FileNotFoundError):
            continue
        for needle in needles:
            if needle.encode() in text:
                found[needle].append(str(path))
    return found


def test_request_bodies_and_model_file_paths_are_not_logged(authed, admin, limits_url, limits_env, tiny_dir):
    """A request whose body holds a marker, a load (its log line names the model), and a load that fails (its
    reason comes from the files): the request's id reaches the ingress's and the worker's logs, the body's
    marker reaches no log file of the session, and no model's folder is in the app's logs."""
    request_id, marker = f"logs-probe-{uuid.uuid4().hex[:8]}", f"body-marker-{uuid.uuid4().hex[:8]}"
    r = authed.post(
        f"{limits_url}/predict",
        json={"model_id": "alpha", "input_data": [f"a text holding {marker}", "and another"]},
        headers={"X-Request-ID": request_id},
    )
    assert r.status_code == 200, r.text
    assert admin.post(f"{limits_url}/models/gamma/unload").status_code == 200
    assert authed.post(f"{limits_url}/predict", json={"model_id": "gamma", "input_data": "load it"}).status_code == 200
    # 'broken' fails to load (its config is not JSON), unless tests/integration/test_errors_and_limits.py has
    # fixed it already, after its own failed loads: either way the worker has logged a failed load.
    broken = authed.post(f"{limits_url}/predict", json={"model_id": "broken", "input_data": "hi"})
    assert broken.status_code in (200, 503), broken.text
    lines = [request_id, "loaded model 'gamma'", "loading model 'broken' failed"]

    def logged() -> bool:
        worker = _replica_log("limits", "ModelWorker")
        return request_id in _replica_log("limits", "Ingress") and all(line in worker for line in lines)

    assert wait_for(logged), "the request's and the loads' log lines never reached the log files"
    # A failed load's line carries the runtime's traceback (its folder redacted, below).
    failed = r"loading model 'broken' failed: .{0,2000}?\nTraceback \(most recent call last\):"
    assert re.search(failed, _replica_log("limits", "ModelWorker"), re.S), "a failed load logged no traceback"
    assert _search(marker)[marker] == []
    # The app's own log lines (its replicas' log files and their processes' output): no folder of a model.
    pids = {**replica_pids("limits", "Ingress"), **replica_pids("limits", "ModelWorker")}.values()
    app_files = [*(_logs() / "serve").glob("replica_limits_*.log")]
    app_files += [p for pid in pids for p in _logs().glob(f"worker-*-{pid}.*")]
    assert len(app_files) >= 2 + 2 * len(pids), app_files
    folders = [str(tiny_dir / "gamma"), str(tiny_dir / "alpha"), str(limits_env["broken"])]
    assert _search(*folders, files=app_files) == {f: [] for f in folders}
