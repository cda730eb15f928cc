"""``make reload``: deploy the registry (``config/models.json``) to the running application, in place.

Ray Serve changes a running application in place only when a deploy changes nothing but the options of
its deployments, ``user_config`` among them: the replicas run ``reconfigure`` and keep running. A change
to an application's ``args``, ``import_path`` or ``runtime_env`` changes its code version instead (a
hash of them: ``get_app_code_version`` in Ray 2.60's Serve), and Serve builds it anew and restarts every
replica, since each deployment's version carries that code version.
And after an edit of ``config/models.json`` alone, ``serve deploy serve_config.yaml`` sends the same config
as before: Serve does not build the application again, so the builder never reads the file, and nothing
changes.

So this command writes the registry into the config it deploys. For each application of the config that
``serve_app.app:build_app`` builds, it reads the registry the way the builder does (``registry_path``,
relative to the project root), checks it, and sets it as the ``user_config`` of the deployments that
hold it (``deployments:`` in the config; anything else there is kept). A bad registry stops it here with
the messages of start-up, and nothing is deployed. Then it sends the config to the cluster's dashboard as
``serve deploy`` does (``--address``, as for ``serve deploy``), and follows the application's status, as
``serve status`` gives it, until the update is over: RUNNING (exit 0), or refused (exit 1, with Serve's
message).

``--print`` writes the config it would deploy and stops: the ``serveConfigV2`` of a RayService carries the
registry the same way (``deploy/rayservice.yaml``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from serve_app.core.config import AppArgs
from serve_app.core.live_registry import REGISTRY_KEY, content_version, registry_user_config
from serve_app.core.paths import resolve_project_path
from serve_app.core.registry import RegistryError, read_registry_file
from serve_app.core.tasks import TaskConfigError

IMPORT_PATH = "serve_app.app:build_app"
REGISTRY_DEPLOYMENTS = ("Ingress", "ModelWorker", "RegistryCheck")
"""The deployments whose ``user_config`` is the registry (``serve_app.app.REGISTRY_DEPLOYMENTS``; a unit
test keeps the two equal, so that this command does not import Ray)."""
DEFAULT_ADDRESS = "http://localhost:8265"
SETTLED = {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"}


class ReloadError(Exception):
    """Nothing was deployed: the config or a registry is bad."""


def render(config: dict[str, Any], check: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """The config with each application's registry as its deployments' ``user_config``, and each
    application's registry version. ``check=False`` skips the registry check (to see the cluster refuse)."""
    out = copy.deepcopy(config)
    versions: dict[str, str] = {}
    apps = [a for a in out.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ReloadError(f"no application in the config is built by {IMPORT_PATH}")
    for app in apps:
        name = app.get("name", "default")
        try:
            args = AppArgs.model_validate(app.get("args") or {})
        except ValueError as e:
            raise ReloadError(f"application {name!r}: {e}") from None
        data = _read(args.registry_path, check, args)
        versions[name] = content_version(data)
        user_config = registry_user_config(data, origin=args.registry_path)
        deployments = app.setdefault("deployments", [])
        for deployment in REGISTRY_DEPLOYMENTS:
            entry = next((d for d in deployments if d.get("name") == deployment), None)
            if entry is None:
                deployments.append(entry := {"name": deployment})
            entry["user_config"] = user_config  # one object: the YAML holds it once, with aliases
    return out, versions


def _read(path: str, check: bool, args: AppArgs) -> object:
    """The registry file's content, checked against the application's tasks and allowed runtime modules."""
    try:
        if check:
            rules = args.registry_rules
            try:
                catalog = rules.catalog()
            except TaskConfigError as e:  # the config's args.tasks, not the registry
                raise ReloadError(f"args.tasks: {e}; nothing was deployed") from None
            return read_registry_file(path, catalog, rules.model_budget_bytes)[0]
        return json.loads(resolve_project_path(path).read_text(encoding="utf-8"))
    except RegistryError as e:
        raise ReloadError(f"the registry is refused, nothing was deployed:\n{e}") from None
    except (OSError, ValueError) as e:
        raise ReloadError(f"{path}: {e}") from None


def serve_env() -> dict[str, str]:
    """The environment of Ray's Serve clients (the ``serve`` command, ``Cluster``): with Ray's token
    authentication on when a token is at hand and RAY_AUTH_MODE does not say otherwise (as the ``ray`` command
    does), since a cluster started with ``serve run`` or ``ray start`` asks for it."""
    env = dict(os.environ)
    token = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray/auth_token").exists()
    if "RAY_AUTH_MODE" not in env and token:
        env["RAY_AUTH_MODE"] = "token"
    return env


class ClusterError(RuntimeError):
    """The cluster's dashboard could not be reached, refused the token, or refused the deploy."""


@contextmanager
def _asking(address: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # Ray's client: ConnectionError, AuthenticationError, ValueError, RuntimeError (a refusal)
        raise ClusterError(f"{address}: {type(e).__name__}: {e}") from None


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _plain(message: object) -> object:
    """A status message without the terminal colours of Ray's error texts (as ``serve status`` prints it)."""
    return _ANSI.sub("", message) if isinstance(message, str) else message


class Cluster:
    """The cluster's Serve, through its dashboard's REST API (``/api/serve/applications/``) with the client
    Ray's ``serve deploy``, ``serve status`` and ``serve config`` use (``ServeSubmissionClient``, which sends
    Ray's token), in this process: a call is one HTTP request. Each ``serve`` command was a process of its own
    that imported Ray, about 2.5 s here, and a reload ran five or more. Ray is imported only when a cluster
    is asked (``--print`` and a refused registry need none). Ray reads its auth mode once in a process, so
    this is made in a process of its own (the command's), before anything else of Ray has run."""

    def __init__(self, address: str) -> None:
        mode = serve_env().get("RAY_AUTH_MODE")
        if mode is not None:  # Ray reads it once in a process, when a client first asks: a token is sent
            os.environ.setdefault("RAY_AUTH_MODE", mode)
        self.address = address
        with _asking(address):
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            self._client = ServeSubmissionClient(address)

    def _application(self, name: str) -> dict[str, Any] | None:
        with _asking(self.address):
            return (self._client.get_serve_details().get("applications") or {}).get(name)

    def status(self, name: str) -> dict[str, Any] | None:
        """The application's status as ``serve status`` gives it (status, message, last_deployed_time_s, and
        each deployment's status and message), or None when there is no such application."""
        app = self._application(name)
        if app is None:
            return None
        deployments = app.get("deployments") or {}
        shown = {d: {"status": v.get("status"), "message": _plain(v.get("message"))} for d, v in deployments.items()}
        return {
            "status": app.get("status"),
            "message": _plain(app.get("message")),
            "last_deployed_time_s": app.get("last_deployed_time_s"),
            "deployments": shown,
        }

    def config(self, name: str) -> dict[str, Any] | None:
        """The config the running application was deployed with (``serve config``), or None (no such
        application yet)."""
        app = self._application(name)
        config = app.get("deployed_app_config") if app else None
        return config if isinstance(config, dict) else None

    def deploy(self, config: dict[str, Any]) -> None:
        """``serve deploy`` the config (ClusterError with the dashboard's message when it refuses it)."""
        with _asking(self.address):
            self._client.deploy_applications(config)


def changed_args(cluster: Cluster, app: dict[str, Any]) -> list[str]:
    """The args of ``app`` that differ from those the running application was deployed with: a change of them
    makes Serve build the application again, every replica restarting. [] when none differ, or when the running
    config cannot be read."""
    running = cluster.config(app.get("name", "default"))
    if running is None or not isinstance(running.get("args"), dict):
        return []
    new, old = app.get("args") or {}, running["args"]
    return sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))


def running_registry(cluster: Cluster, name: str) -> str | None:
    """The version of the registry the running application's config carries (its registry deployments'
    ``user_config``), or None when it cannot be read."""
    running = cluster.config(name)
    deployments = running.get("deployments") if running is not None else None
    for d in deployments if isinstance(deployments, list) else []:
        user_config = d.get("user_config") if isinstance(d, dict) else None
        if d.get("name") in REGISTRY_DEPLOYMENTS and isinstance(user_config, dict) and REGISTRY_KEY in user_config:
            return content_version(user_config[REGISTRY_KEY])
    return None


def refusal(status: dict[str, Any]) -> str:
    """What ``serve status`` says went wrong: the application's message and each failed deployment's, its
    first line and the error at the end of the traceback Serve quotes (a registry's: every bad field)."""
    lines = [f"{status.get('status')}: {status.get('message') or ''}".rstrip(": ")]
    for name, d in (status.get("deployments") or {}).items():
        message = d.get("message") or ""
        if d.get("status") in ("HEALTHY", "UPSCALING", "DOWNSCALING") or not message:
            continue
        lines.append(f"{name} ({d.get('status')}): {message.splitlines()[0]}")
        if "RegistryError: " in message:
            lines += ["  " + line for line in message[message.rindex("RegistryError: ") :].splitlines()]
        elif "Traceback" in message:
            lines.append("  " + message.rstrip().splitlines()[-1].strip())
    return "\n".join(lines)


POLL_S = 0.25
"""How often the command asks for the application's status while an update runs."""


def deploy(cluster: Cluster, config: dict[str, Any], wait: bool = True, timeout_s: float = 300.0) -> dict[str, Any]:
    """``serve deploy`` the config, then, with ``wait``, follow the applications' status until every one of
    them has taken the deploy (RUNNING) or failed it; returns the final statuses by application."""
    names = [a.get("name", "default") for a in config.get("applications") or []]
    before = {n: (cluster.status(n) or {}).get("last_deployed_time_s") for n in names} if wait else {}
    cluster.deploy(config)
    statuses: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    for name in names if wait else []:
        while True:
            status = cluster.status(name) or {}
            taken = status.get("last_deployed_time_s") != before[name]
            if taken and status.get("status") in SETTLED:
                statuses[name] = status
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"application {name!r} is still {status.get('status')} after {timeout_s:g}s")
            time.sleep(POLL_S)
    return statuses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.reload", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="serve_config.yaml", help="the Serve config (serve_config.yaml)")
    parser.add_argument(
        "--address",
        "-a",
        default=os.environ.get("RAY_DASHBOARD_ADDRESS", DEFAULT_ADDRESS),
        help="the Ray dashboard's address, as for `serve deploy` (RAY_DASHBOARD_ADDRESS, else %(default)s)",
    )
    parser.add_argument("--print", action="store_true", help="print the config with the registry and stop")
    parser.add_argument("--no-wait", action="store_true", help="do not follow `serve status` after the deploy")
    parser.add_argument(
        "--no-check", action="store_true", help="deploy the registry unchecked (the cluster then refuses a bad one)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the update (%(default)s)")
    options = parser.parse_args(argv)
    try:
        config = yaml.safe_load(Path(options.config).read_text(encoding="utf-8"))
        rendered, versions = render(config, check=not options.no_check)
    except (OSError, yaml.YAMLError, ReloadError) as e:
        print(f"reload: {e}", file=sys.stderr)
        return 1
    if options.print:
        yaml.safe_dump(rendered, sys.stdout, sort_keys=False)
        return 0
    try:
        return _deploy_and_report(rendered, versions, options)
    except (RuntimeError, TimeoutError, OSError) as e:  # the cluster refused or did not answer: one message
        print(f"reload: {e}", file=sys.stderr)
        return 1


def _deploy_and_report(rendered: dict[str, Any], versions: dict[str, str], options: argparse.Namespace) -> int:
    cluster = Cluster(options.address)
    apps = {a.get("name", "default"): a for a in rendered.get("applications") or []}
    for name, version in versions.items():
        print(f"reload: deploying registry {version} to application {name!r} ({options.address})")
        changed = changed_args(cluster, apps[name])
        if changed:
            print(
                f"reload: application {name!r}: its args changed ({', '.join(changed)}): Serve builds it again and "
                "every replica restarts, its loaded models gone (a registry change alone restarts none)"
            )
    statuses = deploy(cluster, rendered, wait=not options.no_wait, timeout_s=options.timeout)
    failed = False
    for name, status in statuses.items():
        ours = status.get("status") == "RUNNING" and name in versions  # an app of this code, with a registry
        live = running_registry(cluster, name) if ours else None
        if live is not None and live != versions.get(name):  # another deploy landed meanwhile
            failed = True
            print(f"reload: {name!r} RUNNING with registry {live}: a later deploy replaced {versions.get(name, '?')}")
        elif status.get("status") == "RUNNING":
            print(f"reload: {name!r} RUNNING: every replica runs registry {versions.get(name, '?')}")
        else:
            failed = True
            print(f"reload: {name!r} did not take registry {versions.get(name, '?')}:\n{refusal(status)}")
    if not options.no_wait and not failed:
        print("reload: GET /models shows the version of every replica (registry.version, on_every_replica)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
