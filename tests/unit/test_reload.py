"""`make reload`'s command without a cluster: the config it writes (the registry as the deployments'
user_config, nothing else changed), a bad registry stopped before anything is deployed, and how it follows
the application's status to the end of the update. The cluster's dashboard is stood in for here (``Cluster``),
except where none answers; the integration tests run the command against a real dashboard
(tests/integration/test_registry_reload.py)."""

import copy
import json
import re
import socket

import pytest
import yaml

from serve_app import reload
from serve_app.core.live_registry import content_version, parse_user_config
from serve_app.core.paths import PROJECT_ROOT


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps({"models": [{"id": "a", "task": "text-classification", "source": {"path": "models/a"}}]})
    )
    return path


def config(registry, **app):
    return {
        "http_options": {"port": 8000},
        "applications": [
            {
                "name": "multimodel",
                "route_prefix": "/",
                "import_path": reload.IMPORT_PATH,
                "args": {"auth": {"mode": "off"}, "registry_path": str(registry)},
                **app,
            },
            {"name": "other", "import_path": "somewhere:else", "args": {}},
        ],
    }


def test_the_registry_becomes_the_user_config_of_the_deployments_that_hold_it_and_nothing_else_changes(registry):
    original = config(registry, deployments=[{"name": "ModelWorker", "num_replicas": 3}])
    rendered, versions = reload.render(original)
    app = rendered["applications"][0]
    data = json.loads(registry.read_text())
    assert versions == {"multimodel": content_version(data)}
    assert [d["name"] for d in app["deployments"]] == ["ModelWorker", "Ingress", "RegistryCheck"]
    assert app["deployments"][0]["num_replicas"] == 3  # other options stay
    (user_config,) = {json.dumps(d["user_config"], sort_keys=True) for d in app["deployments"]}
    registry_of, version = parse_user_config(json.loads(user_config))
    assert registry_of.ids == ["a"] and version == versions["multimodel"]
    # Serve's code version (import path, runtime env, args) is untouched: the deploy is an in-place update.
    for key in ("import_path", "args", "route_prefix", "name"):
        assert app[key] == original["applications"][0][key]
    assert "runtime_env" not in app
    assert rendered["applications"][1] == original["applications"][1]  # another builder's app: left alone
    assert original["applications"][0]["deployments"] == [{"name": "ModelWorker", "num_replicas": 3}]  # not mutated


def test_the_written_config_holds_the_registry_once(registry, capsys):
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    assert reload.main([str(config_path), "--print"]) == 0
    out = capsys.readouterr().out
    assert out.count('"models/a"') + out.count(" models/a") == 1 and len(re.findall(r"\*id\d+", out)) == 2
    assert yaml.safe_load(out) == reload.render(config(registry))[0]


def test_the_deployments_named_are_the_builders():
    from serve_app import app

    assert reload.REGISTRY_DEPLOYMENTS == app.REGISTRY_DEPLOYMENTS


def test_make_reload_runs_this_command_on_the_config_make_run_runs():
    rule = re.search(r"^reload:(.*)\n((?:\t.*\n)+)", (PROJECT_ROOT / "Makefile").read_text(), re.M)
    # It installs nothing into the venv the running app imports from, unless there is none yet.
    assert rule.group(1).strip() == ""
    assert [line.strip() for line in rule.group(2).splitlines()] == [
        "@test -f $(STAMP) || $(MAKE) --no-print-directory install",
        "$(PY) -m serve_app.reload $(SERVE_CONFIG)",  # serve_config.yaml unless told
    ]
    _, versions = reload.render(yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text()))
    assert list(versions) == ["multimodel"]  # the shipped config and registry render


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "translation"}, "models.0.task: unknown task 'translation'"),
        ({"id": "has space"}, "models.0.id"),
        ({"source": {"hub_id": "org/name", "revision": "main"}}, "models.0.source"),
    ],
)
def test_a_bad_registry_stops_it_before_anything_is_deployed(registry, monkeypatch, capsys, change, message):
    data = json.loads(registry.read_text())
    data["models"][0].update(change)
    registry.write_text(json.dumps(data))
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    called = []
    monkeypatch.setattr(reload, "Cluster", called.append)
    assert reload.main([str(config_path)]) == 1
    err = capsys.readouterr().err
    assert "nothing was deployed" in err and f"{registry}: {message}" in err
    assert called == []
    # --no-check sends it anyway (to see the cluster refuse it); the check is the cluster's then
    rendered, _ = reload.render(config(registry), check=False)
    assert rendered["applications"][0]["deployments"][0]["user_config"]["registry"] == data


@pytest.mark.parametrize(
    "source, reason",
    [
        (None, "No module named 'broken_tasks'"),  # not there
        ("TASK = (", "SyntaxError: '(' was never closed"),
        ("import os\nTASK = os.environ['NO_SUCH_SETTING']", "KeyError: 'NO_SUCH_SETTING'"),
    ],
)
def test_a_task_module_the_args_name_that_cannot_be_imported_is_refused_as_the_configs_fault(
    registry, capsys, monkeypatch, tmp_path, source, reason
):
    if source is not None:
        (tmp_path / "broken_tasks.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    config_path = registry.parent / "serve_config.yaml"
    bad = config(registry)
    bad["applications"][0]["args"]["tasks"] = ["deployments.tasks.text_classification", "broken_tasks"]
    config_path.write_text(yaml.safe_dump(bad))
    assert reload.main([str(config_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"reload: args.tasks: task module 'broken_tasks' cannot be imported: {reason}"), err
    assert err.rstrip().endswith("nothing was deployed") and str(registry) not in err


def test_a_missing_registry_or_a_config_without_the_app_is_refused(registry):
    with pytest.raises(reload.ReloadError, match="registry file not found"):
        reload.render(config(registry.parent / "absent.json"))
    with pytest.raises(reload.ReloadError, match="no application in the config is built by"):
        reload.render({"applications": [{"name": "x", "import_path": "a:b"}]})


class FakeCluster:
    """The cluster's Serve: once the config is deployed, each application's status goes through ``after`` in
    turn, staying at the last; no running config. Called with the dashboard's address, as the class it
    stands in for."""

    def __init__(self, *after):
        self.before = {"status": "RUNNING", "last_deployed_time_s": 1.0}
        self.after, self.deployed, self.calls, self.asked = list(after), None, [], {}

    def __call__(self, address):
        return self

    def deploy(self, config):
        self.calls.append("deploy")
        self.deployed = copy.deepcopy(config)

    def status(self, name):
        self.calls.append("status")
        if self.deployed is None:
            return self.before
        self.asked[name] = self.asked.get(name, 0) + 1
        return self.after[min(self.asked[name], len(self.after)) - 1]

    def config(self, name):
        self.calls.append("config")
        return None


class Running(FakeCluster):
    """A deploy that took: the application RUNNING, and its running config (``running``: its args, its
    deployments), as ``serve config`` gives it."""

    def __init__(self, **running):
        super().__init__({"status": "RUNNING", "last_deployed_time_s": 2.0})
        self.running = running

    def config(self, name):
        self.calls.append("config")
        return {"name": "multimodel", **self.running}


def test_it_follows_serve_status_until_the_update_is_over(registry, monkeypatch, capsys):
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    serve = FakeCluster(
        {"status": "RUNNING", "last_deployed_time_s": 1.0},  # not taken yet
        {"status": "DEPLOYING", "last_deployed_time_s": 2.0},
        {"status": "RUNNING", "last_deployed_time_s": 2.0},
    )
    monkeypatch.setattr(reload, "Cluster", serve)
    monkeypatch.setattr(reload.time, "sleep", lambda s: None)
    assert reload.main([str(config_path)]) == 0
    out = capsys.readouterr().out
    version = content_version(json.loads(registry.read_text()))
    assert f"every replica runs registry {version}" in out
    assert serve.deployed == reload.render(config(registry))[0]
    # Before (2 apps), then each app until it has taken the deploy and settled: 3 times each.
    assert [c for c in serve.calls if c != "config"] == ["status"] * 2 + ["deploy"] + ["status"] * 6


def test_a_change_of_the_apps_args_is_announced_since_every_replica_restarts(registry, monkeypatch, capsys):
    """`serve config` gives the running application's args: when the config's differ, Serve builds the app
    again, and the reload says so before it deploys; a registry change alone says nothing of the kind."""
    config_path = registry.parent / "serve_config.yaml"
    deployed = config(registry)
    config_path.write_text(yaml.safe_dump(deployed))

    monkeypatch.setattr(reload.time, "sleep", lambda s: None)
    app = next(a for a in deployed["applications"] if a["name"] == "multimodel")
    monkeypatch.setattr(reload, "Cluster", Running(args=app["args"]))
    assert reload.main([str(config_path)]) == 0
    assert "args changed" not in capsys.readouterr().out
    monkeypatch.setattr(reload, "Cluster", Running(args={**app["args"], "request_timeout_s": 1, "tasks": ["x"]}))
    assert reload.main([str(config_path)]) == 0
    assert "application 'multimodel': its args changed (request_timeout_s, tasks): Serve builds it again" in (
        capsys.readouterr().out
    )


def test_a_deploy_that_a_later_one_replaced_is_not_reported_as_live(registry, monkeypatch, capsys):
    """Two reloads a second apart: the first sees its application RUNNING, but with the second's registry
    (`serve config`), and says so with exit 1, not that every replica runs its own."""
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    later = {"models": [{"id": "b", "task": "text-classification", "source": {"path": "models/b"}}]}

    def replaced(registry):
        return Running(deployments=[{"name": "ModelWorker", "user_config": {"registry": registry, "origin": "x"}}])

    monkeypatch.setattr(reload.time, "sleep", lambda s: None)
    monkeypatch.setattr(reload, "Cluster", replaced(later))
    assert reload.main([str(config_path)]) == 1
    ours = content_version(json.loads(registry.read_text()))
    assert f"RUNNING with registry {content_version(later)}: a later deploy replaced {ours}" in capsys.readouterr().out
    monkeypatch.setattr(reload, "Cluster", replaced(json.loads(registry.read_text())))  # its own: live
    assert reload.main([str(config_path)]) == 0
    assert f"every replica runs registry {ours}" in capsys.readouterr().out


def test_a_refused_update_is_reported_with_serves_message_and_exit_1(registry, monkeypatch, capsys):
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    failed = {
        "status": "DEPLOY_FAILED",
        "message": "Failed to update the deployments ['RegistryCheck'].",
        "last_deployed_time_s": 2.0,
        "deployments": {
            "RegistryCheck": {
                "status": "DEPLOY_FAILED",
                "message": "The deployment failed to start 3 times in a row. Error:\nray::ServeReplica...\n"
                "Traceback (most recent call last):\n  File ...\n"
                "serve_app.core.registry.RegistryError: x: models.0.task: bad\nx: models.1.id: bad too",
            },
            "Ingress": {"status": "HEALTHY", "message": ""},
        },
    }
    monkeypatch.setattr(reload, "Cluster", FakeCluster(failed))
    monkeypatch.setattr(reload.time, "sleep", lambda s: None)
    assert reload.main([str(config_path), "--no-check"]) == 1
    out = capsys.readouterr().out
    assert "DEPLOY_FAILED: Failed to update the deployments ['RegistryCheck']." in out
    assert "RegistryCheck (DEPLOY_FAILED): The deployment failed to start 3 times in a row. Error:\n" in out
    assert "\n  RegistryError: x: models.0.task: bad\n  x: models.1.id: bad too\n" in out  # every bad field
    assert "Ingress (" not in out and "Traceback" not in out


def test_the_serve_commands_send_rays_token_when_there_is_one(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "RAY_AUTH_MODE" not in reload.serve_env()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("t")
    assert reload.serve_env()["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # said explicitly: kept
    assert reload.serve_env()["RAY_AUTH_MODE"] == "disabled"


def test_render_leaves_its_input_alone(registry):
    original = config(registry)
    kept = copy.deepcopy(original)
    reload.render(original)
    assert original == kept


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "address, error",
    [
        (f"http://127.0.0.1:{closed_port()}", "ConnectionError: Failed to connect to Ray at address"),
        ("127.0.0.1:8265", "ValueError: Got an unexpected address"),  # the dashboard's address is http(s)
    ],
)
def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_1(registry, capsys, address, error):
    """The dashboard down, or an address that is not one: one ``reload:`` line naming it, no traceback (Ray's
    own client, with nothing standing in for it)."""
    config_path = registry.parent / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config(registry)))
    assert reload.main([str(config_path), "--address", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"reload: {address}: {error}") and "Traceback" not in err, err


def test_the_cluster_is_asked_with_rays_token_when_there_is_one(monkeypatch, tmp_path):
    """Ray's client sends the token only with RAY_AUTH_MODE=token in this process's environment, which a
    cluster started with `serve run` asks for."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("t")
    with pytest.raises(reload.ClusterError):
        reload.Cluster(f"http://127.0.0.1:{closed_port()}")
    assert reload.os.environ["RAY_AUTH_MODE"] == "token"
