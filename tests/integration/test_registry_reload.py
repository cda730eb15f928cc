"""The registry changes while the app serves: a model added, a model's files changed, a model removed, a bad
registry refused, each with traffic flowing, and no replica restarted.

The app is deployed as `make run` deploys it: from a config (`serve deploy` through this session's dashboard,
Serve's REST API), with no registry in it, so the builder reads the registry file. Every change then goes
through `python -m serve_app.reload`, the command `make reload` runs: it writes the registry into the config
as the deployments' user_config and `serve deploy`s that. (A deploy from a config removes the apps deployed
from an earlier config that it does not name; the other test modules deploy with serve.run, which it leaves
alone.) The tiny models' labels name the model, so an answer shows which files produced it.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from demo.tiny_models import build_text_model, write_registry
from serve_app.core import ray_internals
from serve_app.core.live_registry import content_version
from serve_app.core.paths import PROJECT_ROOT
from serve_app.reload import IMPORT_PATH, serve_env
from tests.helpers import Background, replica_pids, settled, tiny_args, wait_for

pytestmark = pytest.mark.integration

APP, PREFIX = "reload", "/reload"
TEXT = "text-classification"


class LiveApp:
    def __init__(self, url, dashboard, base, registry, config):
        self.url, self.dashboard, self.base, self.registry, self.config = url, dashboard, base, registry, config
        self.folders = {}


@pytest.fixture(scope="module")
def app(serve_url, dashboard_url, tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("reload")
    live = LiveApp(serve_url + PREFIX, dashboard_url, base, base / "models.json", base / "serve_config.yaml")
    live.folders = {name: tiny_dir / name for name in ["alpha", "beta", "gamma", "delta"]}
    write_registry(live.registry, {m: (TEXT, live.folders[m]) for m in ["alpha", "beta", "gamma"]})
    # A request for a model whose only holder is applying a change waits for it up to holder_grace_s (3 s by
    # default), then loads a copy elsewhere. The tests count loads across a change: a holder that takes
    # longer on a slow machine must not add one.
    args = tiny_args(live.registry, 2, worker={"routing": {"holder_grace_s": 60}})
    config = {"applications": [{"name": APP, "route_prefix": PREFIX, "import_path": IMPORT_PATH, "args": args}]}
    live.config.write_text(yaml.safe_dump(config))
    deployed = subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "deploy", str(live.config), "--address", dashboard_url],
        capture_output=True,
        text=True,
        env=serve_env(),
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stderr
    assert wait_for(lambda: _app_status() in ("RUNNING", "DEPLOY_FAILED"), interval=0.5)
    assert _app_status() == "RUNNING", serve.status().applications[APP]
    yield live
    ray_internals.delete_app_in_background(APP)  # not waiting out the ingress drain (30 s)


def _app_status():
    app = serve.status().applications.get(APP)
    return app.status if app else None


def push(
    app: LiveApp, models: dict[str, str], *options: str, tasks: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, str]:
    """Write the registry file (id -> folder name under app.folders; ``tasks``: id -> task where not text
    classification) and run `make reload`'s command."""
    tasks = tasks or {}
    write_registry(app.registry, {m: (tasks.get(m, TEXT), app.folders[folder]) for m, folder in models.items()})
    return reload(app, *options), content_version(json.loads(app.registry.read_text()))


def reload(app: LiveApp, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serve_app.reload", str(app.config), "--address", app.dashboard]
    return subprocess.run([*command, "--timeout", "240", *options], capture_output=True, text=True, timeout=300)


def listing(client, app) -> dict:
    return client.get(f"{app.url}/models").json()


def replica_ids(client, app) -> dict[str, list[str]]:
    """Every replica of the app: the worker replicas and the answering ingress replica as GET /models names
    them, and Serve's own record of the three deployments' replicas."""
    body = listing(client, app)
    serve_side = {d: sorted(replica_pids(APP, d)) for d in ("Ingress", "ModelWorker", "RegistryCheck")}
    workers = sorted(r["replica_id"] for r in body["replicas"])
    return {"workers": workers, "ingress": [body["registry"]["replica_id"]], **serve_side}


def runs_everywhere(client, app, version: str) -> bool:
    registry = listing(client, app)["registry"]
    return registry["version"] == version and registry["on_every_replica"]


def predict(client, app, model_id):
    return client.post(f"{app.url}/predict", json={"model_id": model_id, "input_data": "hello world"})


def traffic(app, models: list[str]):
    """A background step: one prediction for a random one of the models -> (model, status, top label)."""

    def step(c: httpx.Client, i: int):
        model_id = random.choice(models)
        r = predict(c, app, model_id)
        return model_id, r.status_code, r.json()["predictions"][0]["label"] if r.status_code == 200 else r.text

    return step


def model(client, app, model_id) -> dict:
    return next(m for m in listing(client, app)["models"] if m["id"] == model_id)


def test_a_model_added_answers_at_once_and_no_replica_restarts(client, app):
    """An embeddings model (the demo's `embed`, another task than the registry's others) added live."""
    app.folders["embed"] = PROJECT_ROOT / "models" / "embed"
    for model_id in ("alpha", "beta"):
        assert predict(client, app, model_id).status_code == 200
    assert wait_for(lambda: model(client, app, "alpha")["loaded"] and model(client, app, "beta")["loaded"])
    before = replica_ids(client, app)
    with Background(traffic(app, ["alpha", "beta"]), threads=2) as flow:  # two models, four slots: no eviction
        flow.wait_until(4)
        counts = {m: model(client, app, m) for m in ("alpha", "beta")}
        assert predict(client, app, "embed").status_code == 404
        done, version = push(
            app,
            {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "embed": "embed"},
            tasks={"embed": "feature-extraction"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"registry {version}" in done.stdout and "RUNNING" in done.stdout
        for model_id, was in counts.items():  # unchanged models stay loaded, with their counts
            now = model(client, app, model_id)
            assert now["loaded"] and now["unload_count"] == was["unload_count"], (was, now)
            assert now["load_count"] >= was["load_count"] and now["last_used_at"] >= was["last_used_at"]
        answer = predict(client, app, "embed")  # the next request for it
        assert answer.status_code == 200, answer.text
        assert answer.json()["task"] == "feature-extraction"
        assert len(answer.json()["predictions"][0]["embedding"]) == 384  # all-MiniLM-L6-v2's size
        flow.wait_until(len(flow.results) + 4)
    assert [r for r in flow.results if r[1] != 200] == []  # no request failed during the change
    assert wait_for(lambda: runs_everywhere(client, app, version))
    assert [m["id"] for m in listing(client, app)["models"]] == ["alpha", "beta", "gamma", "embed"]
    assert replica_ids(client, app) == before


def test_a_changed_source_is_loaded_from_its_new_files_by_the_next_request(client, app):
    app.folders["beta-v2"] = build_text_model(app.base / "beta-v2", "betanew", seed=7)  # labels betanew-0, -1
    done, _ = push(app, {"alpha": "alpha", "beta": "beta", "gamma": "gamma"})
    assert done.returncode == 0, done.stdout + done.stderr
    for model_id in ("alpha", "beta"):
        assert predict(client, app, model_id).json()["predictions"][0]["label"].startswith(f"{model_id}-")
    assert wait_for(lambda: model(client, app, "alpha")["loaded"] and model(client, app, "beta")["loaded"])
    before = replica_ids(client, app)
    beta, alpha = settled(lambda: (model(client, app, "beta"), model(client, app, "alpha")))  # loads reported
    with Background(traffic(app, ["alpha", "beta"]), threads=2) as flow:
        flow.wait_until(6)
        done, version = push(app, {"alpha": "alpha", "beta": "beta-v2", "gamma": "gamma"})
        assert done.returncode == 0, done.stdout + done.stderr
        answer = predict(client, app, "beta")  # the next request
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"].startswith("betanew-")
        flow.wait_until(len(flow.results) + 6)
    assert [r for r in flow.results if r[1] != 200] == []  # every request answered, during the change too
    labels = {m: {label.split("-")[0] for mm, _, label in flow.results if mm == m} for m in ("alpha", "beta")}
    assert labels["alpha"] == {"alpha"} and labels["beta"] <= {"beta", "betanew"}
    for _ in range(4):  # from now on, the new files only
        assert predict(client, app, "beta").json()["predictions"][0]["label"].startswith("betanew-")
    assert wait_for(lambda: runs_everywhere(client, app, version))
    after, alpha_after = settled(lambda: (model(client, app, "beta"), model(client, app, "alpha")))
    assert after["load_count"] > beta["load_count"] and after["unload_count"] > beta["unload_count"]
    assert alpha_after["load_count"] == alpha["load_count"], (alpha, alpha_after)  # untouched
    assert replica_ids(client, app) == before
    # The old copies of beta are freed: no replica keeps more than its two models in memory.
    assert wait_for(lambda: all(r["counters"]["live_models"] <= 2 for r in listing(client, app)["replicas"]))


def test_a_removed_model_is_404_and_its_memory_is_freed_while_the_others_stay(client, app):
    app.folders["fat"] = build_text_model(app.base / "fat", "fat", seed=3, dense_size=200_000)  # 25.6 MB
    done, _ = push(app, {"alpha": "alpha", "fat": "fat"})
    assert done.returncode == 0, done.stdout + done.stderr
    for model_id in ("alpha", "fat"):
        assert predict(client, app, model_id).status_code == 200
    assert wait_for(lambda: model(client, app, "fat")["loaded"] and model(client, app, "alpha")["loaded"])
    (holder,) = model(client, app, "fat")["replicas"]

    def weights_only_of_what_it_holds():  # the holder's runtimes in memory are those of the models it holds
        replica = next(r for r in listing(client, app)["replicas"] if r["replica_id"] == holder)
        return replica["counters"]["live_models"] == len(replica["models"])

    assert wait_for(weights_only_of_what_it_holds)
    alpha, before = settled(lambda: model(client, app, "alpha")), replica_ids(client, app)
    with Background(traffic(app, ["alpha", "fat"]), threads=2) as flow:
        flow.wait_until(6)
        done, version = push(app, {"alpha": "alpha"})
        assert done.returncode == 0, done.stdout + done.stderr
        gone = predict(client, app, "fat")
        assert gone.status_code == 404 and gone.json()["error"] == "model_not_found", gone.text
        flow.wait_until(len(flow.results) + 6)
    assert max(status for _, status, _ in flow.results) < 500, [r for r in flow.results if r[1] >= 500]
    assert all(status == 200 for m, status, _ in flow.results if m == "alpha")
    assert wait_for(lambda: runs_everywhere(client, app, version))
    body = listing(client, app)
    assert [m["id"] for m in body["models"]] == ["alpha"]
    assert all("fat" not in r["models"] for r in body["replicas"])
    assert wait_for(weights_only_of_what_it_holds), listing(client, app)["replicas"]  # fat's weights are freed
    after = settled(lambda: model(client, app, "alpha"))
    assert after["loaded"] and after["load_count"] == alpha["load_count"]  # the other model stayed loaded
    assert replica_ids(client, app) == before


BAD = {
    "an invalid field": ({"task": "translation"}, "models.1.task: unknown task 'translation'"),
    "a duplicate id": ({"id": "alpha"}, "models.1.id: duplicate model id 'alpha'"),
    "a bad hub id": ({"source": {"hub_id": "not a hub id", "revision": "main"}}, "models.1.source"),
    "a path out of the model roots": (
        {"source": {"path": "../../../../etc"}},
        "models.1.source: path '../../../../etc' is outside the model roots",
    ),
}


def write_bad(app, change: dict) -> None:
    write_registry(app.registry, {m: (TEXT, app.folders[m]) for m in ("alpha", "beta")})
    data = json.loads(app.registry.read_text())
    data["models"][1].update(change)
    app.registry.write_text(json.dumps(data))


# Each kind's message is the registry's own (tests/unit/test_registry.py has every kind); through `make reload`,
# one field error and the one refusal that depends on the operator's model roots.
@pytest.mark.parametrize("kind", ["an invalid field", "a path out of the model roots"])
def test_make_reload_refuses_a_bad_registry_before_it_deploys_anything(client, app, kind):
    done, version = push(app, {"alpha": "alpha", "beta": "beta"})
    assert done.returncode == 0, done.stdout + done.stderr
    deployed_at = serve.status().applications[APP].last_deployed_time_s
    change, message = BAD[kind]
    write_bad(app, change)
    refused = reload(app)
    assert refused.returncode == 1 and "nothing was deployed" in refused.stderr
    assert message in refused.stderr, refused.stderr  # the field, as at start-up
    assert serve.status().applications[APP].last_deployed_time_s == deployed_at  # Serve got nothing
    assert listing(client, app)["registry"]["version"] == version


def test_a_bad_registry_that_reaches_the_app_is_refused_whole_and_the_old_one_keeps_serving(client, app):
    done, version = push(app, {"alpha": "alpha", "beta": "beta"})
    assert done.returncode == 0, done.stdout + done.stderr
    before = replica_ids(client, app)
    _, message = BAD["an invalid field"]
    with Background(traffic(app, ["alpha", "beta"]), threads=2) as flow:
        flow.wait_until(4)
        write_bad(app, BAD["an invalid field"][0])
        refused = reload(app, "--no-check")  # as a RayService's serveConfigV2 or a hand-made config would
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "DEPLOY_FAILED" in refused.stdout and message in refused.stdout, refused.stdout
        flow.wait_until(len(flow.results) + 4)
    assert [r for r in flow.results if r[1] != 200] == []  # no request failed, before, during or after
    # serve status: the registry check failed the update, with start-up's message; the others serve on.
    status = serve.status().applications[APP]
    assert status.status == "DEPLOY_FAILED"
    assert message in status.deployments["RegistryCheck"].message
    assert {d: status.deployments[d].status for d in ("Ingress", "ModelWorker")} == {
        "Ingress": "HEALTHY",
        "ModelWorker": "HEALTHY",
    }
    # GET /models: the old registry, and the refusal, on the ingress replica and on every worker replica.
    body = listing(client, app)
    assert body["registry"]["version"] == version and message in body["registry"]["refused"]["message"]
    assert wait_for(
        lambda: all(
            r["registry"]["version"] == version and r["registry"]["refused"] is not None
            for r in listing(client, app)["replicas"]
        )
    )
    assert [m["id"] for m in body["models"]] == ["alpha", "beta"]
    assert predict(client, app, "beta").status_code == 200
    assert {k: v for k, v in replica_ids(client, app).items() if k != "RegistryCheck"} == {
        k: v for k, v in before.items() if k != "RegistryCheck"
    }
    # The next good registry is taken, and the refusal is gone.
    done, fixed = push(app, {"alpha": "alpha", "beta": "beta", "gamma": "gamma"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert serve.status().applications[APP].status == "RUNNING"
    assert wait_for(lambda: runs_everywhere(client, app, fixed))
    assert listing(client, app)["registry"]["refused"] is None
