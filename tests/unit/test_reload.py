"""`make reload`'s command without a cluster: the config it writes (the registry as the deployments'
user_config, nothing else changed), a bad registry stopped before anything is deployed, and how it follows
the application's status to the end of the update. The cluster is stood in for by a fake ``Cluster`` in this
process, or by a fake dashboard over HTTP with the command in a process of its own, as `make reload` runs it
(Ray's client keeps the auth mode it first reads for the life of a process); the integration tests run the
command against a real dashboard (tests/integration/test_registry_reload.py)."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


@pytest.fixture
def config_path(registry):
    """serve_config.yaml beside the registry, holding ``config(registry)``."""
    path = registry.parent / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config(registry)))
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


def test_the_written_config_holds_the_registry_once(registry, config_path, capsys):
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
def test_a_bad_registry_stops_it_before_anything_is_deployed(
    registry, config_path, monkeypatch, capsys, change, message
):
    data = json.loads(registry.read_text())
    data["models"][0].update(change)
    registry.write_text(json.dumps(data))
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
    registry, config_path, capsys, monkeypatch, tmp_path, source, reason
):
    if source is not None:
        (tmp_path / "broken_tasks.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
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


def test_it_follows_serve_status_until_the_update_is_over(registry, config_path, monkeypatch, capsys):
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


def test_a_change_of_the_apps_args_is_announced_since_every_replica_restarts(
    registry, config_path, monkeypatch, capsys
):
    """`serve config` gives the running application's args: when the config's differ, Serve builds the app
    again, and the reload says so before it deploys; a registry change alone says nothing of the kind."""
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


def test_a_deploy_that_a_later_one_replaced_is_not_reported_as_live(registry, config_path, monkeypatch, capsys):
    """Two reloads a second apart: the first sees its application RUNNING, but with the second's registry
    (`serve config`), and says so with exit 1, not that every replica runs its own."""
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


def test_a_refused_update_is_reported_with_serves_message_and_exit_1(registry, config_path, monkeypatch, capsys):
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


class FakeDashboard(ThreadingHTTPServer):
    """A Ray dashboard's Serve REST API over HTTP, as the command's client (Ray's own) talks to it: the version,
    the applications' details as the controller gives them, a deploy. After a deploy the application is
    DEPLOYING for one look, then ``settles`` as (status, message); it records each request's Authorization
    header, and answers 401 without a token when ``token`` is set."""

    def __init__(self, token=None, settles=("RUNNING", "")):
        self.token, self.settles, self.auth, self.deployed, self.looks = token, settles, [], None, 0
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __exit__(self, *exc):
        self.shutdown()
        return super().__exit__(*exc)

    def details(self):
        """Every application of the config: RUNNING before the deploy, then DEPLOYING for one look, then as it
        ``settles``."""
        if self.deployed is None:
            return {"applications": {"multimodel": {"status": "RUNNING", "message": "", "last_deployed_time_s": 1.0}}}
        self.looks += 1
        status, message = ("DEPLOYING", "") if self.looks == 1 else self.settles
        apps = {}
        for config in self.deployed["applications"]:
            deployments = {d["name"]: {"status": "HEALTHY", "message": ""} for d in config.get("deployments", [])}
            apps[config["name"]] = {
                "status": status,
                "message": message,
                "last_deployed_time_s": 2.0,
                "deployments": deployments,
                "deployed_app_config": config,
            }
        return {"applications": apps}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _allowed(self):
            self.server.auth.append(self.headers.get("authorization"))
            if self.server.token and self.headers.get("authorization") != f"Bearer {self.server.token}":
                self._answer(401, {"error": "Unauthorized: Missing authentication token"})
                return False
            return True

        def do_GET(self):
            if self._allowed():
                body = {"ray_version": "2.60.0"} if self.path == "/api/ray/version" else self.server.details()
                self._answer(200, body)

        def do_PUT(self):
            if self._allowed():
                self.server.deployed = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self._answer(200, {})


def run_reload(config_path, address, home, **env):
    """The command in a process of its own, as `make reload` runs it: Ray reads its auth mode once a process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home), **env}
    command = [sys.executable, "-m", "serve_app.reload", str(config_path), "--address", address]
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=PROJECT_ROOT, timeout=120)


@pytest.fixture
def home(tmp_path):
    """A home with Ray's token in it, as `serve run` leaves one (~/.ray/auth_token)."""
    (tmp_path / "home/.ray").mkdir(parents=True)
    (tmp_path / "home/.ray/auth_token").write_text(TOKEN)
    return tmp_path / "home"


TOKEN = "0123456789abcdef0123456789abcdef"


def test_it_deploys_through_the_dashboards_api_with_rays_token_and_follows_the_status(registry, config_path, home):
    with FakeDashboard(token=TOKEN) as dashboard:
        done = run_reload(config_path, dashboard.url, home)
    assert done.returncode == 0, done.stdout + done.stderr
    version = content_version(json.loads(registry.read_text()))
    assert f"'multimodel' RUNNING: every replica runs registry {version}" in done.stdout
    assert dashboard.deployed == json.loads(json.dumps(reload.render(config(registry))[0]))  # the config, as rendered
    assert dashboard.looks >= 2  # DEPLOYING, then RUNNING
    assert set(dashboard.auth) == {f"Bearer {TOKEN}"}  # every request carried the token from ~/.ray
    # Told not to send one, the command gets the dashboard's 401 as one line.
    with FakeDashboard(token=TOKEN) as dashboard:
        refused = run_reload(config_path, dashboard.url, home, RAY_AUTH_MODE="disabled")
    assert refused.returncode == 1 and dashboard.deployed is None
    assert refused.stderr.startswith(f"reload: {dashboard.url}: AuthenticationError: Authentication required")
    assert "Traceback" not in refused.stderr


def test_a_refusal_is_reported_from_the_dashboards_status_without_terminal_colours(config_path, home):
    coloured = "\x1b[36mray::build_app\x1b[39m failed: ValueError: bad"  # as Ray's task errors are
    with FakeDashboard(settles=("DEPLOY_FAILED", coloured)) as dashboard:
        done = run_reload(config_path, dashboard.url, home)
    assert done.returncode == 1
    assert "did not take registry" in done.stdout
    assert "DEPLOY_FAILED: ray::build_app failed: ValueError: bad" in done.stdout
    assert "\x1b" not in done.stdout


@pytest.mark.parametrize(
    "address, error",
    [
        (f"http://127.0.0.1:{closed_port()}", "ConnectionError: Failed to connect to Ray at address"),
        ("127.0.0.1:8265", "ValueError: Got an unexpected address"),  # the dashboard's address is http(s)
    ],
)
def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_1(config_path, home, address, error):
    """The dashboard down, or an address that is not one: one ``reload:`` line naming it, no traceback."""
    done = run_reload(config_path, address, home)
    assert done.returncode == 1
    assert done.stderr.startswith(f"reload: {address}: {error}") and "Traceback" not in done.stderr, done.stderr
