"""Integration fixtures: one real Ray instance for the whole test session, apps deployed on it, real HTTP
and real gRPC (Ray Serve's gRPC proxy with the Open Inference Protocol's service, as serve_config.yaml
registers it; a call names its app in the ``application`` metadata, since several apps run side by side).

Ray starts once (about 25 s on a 2-core machine) and is shut down at the end
of the session, which stops every Ray process it started.
"""

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from demo.tiny_models import write_registry
from deployments.ingress.protocols.v2_grpc import SERVICER_FUNCTION
from serve_app.app import build_app
from serve_app.core.config import AppArgs
from serve_app.core.paths import PROJECT_ROOT
from serve_app.devtools import free_port, no_haproxy_left
from tests.helpers import ADMIN_KEY, API_KEY, MODEL_ROOTS, tiny_args, wait_for

pytestmark = pytest.mark.integration

METRICS_PORT = free_port()
GRPC_PORT = free_port()
DASHBOARD_PORT = free_port()


@pytest.fixture(scope="session")
def metrics_url() -> str:
    """Ray's Prometheus export endpoint of this node."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def serve_url() -> Iterator[str]:
    port = free_port()
    # The 'limits' app takes its keys from the environment, as a deployment would; the apps with auth off log
    # them as ignored.
    os.environ.update({"MMS_API_KEY": API_KEY, "MMS_ADMIN_KEY": ADMIN_KEY})
    # Logical CPUs, not cores: several small apps share the machine during the session. The environment
    # (config/serve.env, set by tests/conftest.py) reaches every Ray process from this one.
    # The dashboard serves Serve's REST API, which `serve deploy` (and `make reload`) talk to. A Ray of its own
    # ("local"), even where another session's Ray runs on this machine (make run, another test run): without
    # it, ray.init joins the newest one it finds.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=True,
        dashboard_port=DASHBOARD_PORT,
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options={"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        # Ray's shutdown ends Serve's actors, and no_haproxy_left the HAProxy processes: Serve's own shutdown would
        # first wait out the ingress replicas' drain (30 s), for load balancers this session has none of.
        with no_haproxy_left():  # no process of this session outlives it
            ray.shutdown()


@pytest.fixture(scope="session")
def dashboard_url(serve_url) -> str:
    """The Ray dashboard of this session: Serve's REST API, for `serve deploy` and `serve status`."""
    return f"http://127.0.0.1:{DASHBOARD_PORT}"


@pytest.fixture(scope="session")
def grpc_target(serve_url) -> str:
    """host:port of Serve's gRPC entry (HAProxy's gRPC frontend in throughput-optimized mode)."""
    return f"127.0.0.1:{GRPC_PORT}"


@pytest.fixture(scope="session")
def silent_connection(serve_url) -> Iterator[tuple[socket.socket, float]]:
    """A connection to Serve's HTTP port that never sends a byte, and when it was opened: as soon as Serve is up
    (``deploy`` asks for it), so that test_shipped_mode's check, minutes later, finds it closed without
    waiting."""
    host, port = serve_url.removeprefix("http://").split(":")
    opened: list[socket.socket] = []

    def connect() -> bool:
        with contextlib.suppress(OSError):
            opened.append(socket.create_connection((host, int(port)), timeout=5))
        return bool(opened)

    assert wait_for(connect, timeout=60, interval=0.5), f"nothing accepts connections at {serve_url}"
    with opened[0] as sock:
        yield sock, time.monotonic()


@pytest.fixture(scope="session")
def deploy(serve_url, silent_connection) -> Callable[..., str]:
    """Deploy an application under /<name> (or the given route prefix) with the given args; returns its base URL.
    (Apps are deleted by the fixtures that deploy them, or with Serve at the end of the session.)"""

    def _deploy(name: str, args: dict, route_prefix: str | None = None) -> str:
        prefix = route_prefix or f"/{name}"
        serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix=prefix)
        return serve_url + prefix.rstrip("/")

    return _deploy


@pytest.fixture(scope="session")
def demo_models() -> None:
    """The demo models of the registry, built offline if missing (``make models`` does the same)."""
    from demo.build_models import main

    main([])


@pytest.fixture(scope="session")
def demo_url(deploy, demo_models) -> str:
    """The application exactly as serve_config.yaml configures it, at the root path."""
    app = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"][0]
    return deploy("demo", app["args"], route_prefix=app["route_prefix"])


@pytest.fixture(scope="session")
def tiny_registry(tiny_dir) -> Path:
    models = {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma", "delta"]}
    models["pixels"] = ("image-classification", tiny_dir / "pixels")
    return write_registry(tiny_dir / "registry.json", models)


@pytest.fixture(scope="session")
def mixed_url(deploy, tiny_registry) -> str:
    """Two worker replicas over the tiny models, and 'sleeper', a model of the tests' own whose load takes
    8 s (tests.byo_runtimes:Sized): a request that loads it stays on its replica that long."""
    import json

    registry = json.loads(tiny_registry.read_text())
    sleeper = {
        "id": "sleeper",
        "task": "text-classification",
        "source": {"path": str(tiny_registry.parent)},
        "runtime": "tests.byo_runtimes:Sized",
        "parameters": {"size": 1000, "load_s": 8},
    }
    path = tiny_registry.with_name("mixed-registry.json")
    path.write_text(json.dumps({"models": [*registry["models"], sleeper]}, indent=1))
    return deploy("mixed", tiny_args(path, replicas=2, runtime_modules=["tests.byo_runtimes"]))


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def image_server(tmp_path_factory) -> Iterator[str]:
    """A local HTTP server with images, for the URL-fetch cases (bounded: serves until the session ends)."""
    import functools
    import http.server
    import shutil
    import threading

    folder = tmp_path_factory.mktemp("served-images")
    shutil.copy(PROJECT_ROOT / "samples/images/square.jpg", folder / "square.jpg")
    (folder / "big.bin").write_bytes(b"\0" * (1536 * 1024))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.jpg":  # answers after the app's 5 s fetch timeout
                time.sleep(7)
            if self.path == "/redirect.jpg":  # to an image the app may fetch: redirects are not followed
                self.send_response(302)
                self.send_header("Location", "/square.jpg")
                self.end_headers()
                return None
            return super().do_GET()

        def log_message(self, *args):
            pass

    shutil.copy(PROJECT_ROOT / "samples/images/square.jpg", folder / "slow.jpg")
    handler = functools.partial(Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def limits_env(tiny_dir, tmp_path_factory):
    """Folders and registry of the 'limits' app: an image root with a symlink out of it, a broken model."""
    import shutil

    from PIL import Image

    base = tmp_path_factory.mktemp("limits")
    root = base / "images"
    root.mkdir()
    for name in ["square.jpg", "circle.jpg"]:
        shutil.copy(PROJECT_ROOT / "samples/images" / name, root / name)
    Image.new("RGB", (6000, 4000), (20, 120, 200)).save(root / "huge.jpg", quality=60)  # 24 megapixels
    for k in range(3):  # 16 megapixels each, a few KB: three are over the app's pixel budget per request
        Image.new("RGB", (4000, 4000), (40 * k, 90, 160)).save(root / f"big{k}.png")
    Image.new("RGB", (8, 8)).save(root / "tagged.tiff", format="TIFF")
    (root / "tiff-named.png").write_bytes((root / "tagged.tiff").read_bytes())  # a TIFF with a PNG name
    (root / "over-limit.jpg").write_bytes(b"\xff\xd8" + b"\0" * (1024 * 1024 + 10))  # over max_image_bytes
    (base / "secret.png").write_bytes((PROJECT_ROOT / "samples/images/square.jpg").read_bytes())
    (root / "escape.png").symlink_to(base / "secret.png")
    broken = base / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    models = {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma", "delta"]}
    models["pixels"] = ("image-classification", tiny_dir / "pixels")
    models["broken"] = ("text-classification", broken)
    # Only the metrics test sends traffic for these two, so every count it reads starts at zero.
    from demo.tiny_models import build_text_model

    models["epsilon"] = ("text-classification", build_text_model(base / "epsilon", "epsilon", seed=5))
    cracked = base / "cracked"
    cracked.mkdir()
    (cracked / "config.json").write_text("{ cracked")
    models["cracked"] = ("text-classification", cracked)
    registry = write_registry(base / "registry.json", models, preload=["beta"])
    # 'stuck': a model of the tests' own whose load returns only once the file stuck_gate exists
    entries = json.loads(registry.read_text())
    gate = base / "stuck-gate"
    stuck = {"size": 1000, "load_gate": str(gate)}
    source = {"path": str(base)}
    entries["models"].append(
        {"id": "stuck", "task": "text-classification", "source": source, "runtime": SIZED, "parameters": stuck}
    )
    registry.write_text(json.dumps(entries, indent=1))
    return {"base": base, "root": root, "broken": broken, "registry": registry, "stuck_gate": gate}


LIMITS_BODY_TIMEOUT_S = 2
"""The 'limits' app's body_timeout_s: short, so that the slow senders' test is short."""
LIMITS_LOAD_TIMEOUT_S = 6
"""The 'limits' app's worker.load_timeout_s: short, so that the test of a load that hangs is short."""
SIZED = "tests.byo_runtimes:Sized"


@pytest.fixture(scope="session")
def limits_url(deploy, limits_env, image_server) -> str:
    """One worker replica, small limits, an API key, URL fetching on for the local image server only."""
    return deploy(
        "limits",
        {
            "registry_path": str(limits_env["registry"]),
            "model_roots": MODEL_ROOTS,
            "auth": {"mode": "api_key"},  # keys from MMS_API_KEY and MMS_ADMIN_KEY (see serve_url)
            "image_root": str(limits_env["root"]),
            "body_timeout_s": LIMITS_BODY_TIMEOUT_S,
            "max_body_bytes": 64 * 1024,
            "max_image_bytes": 1024 * 1024,
            "max_request_pixels": 40_000_000,
            "max_text_chars": 12_000,
            "max_list_items": 8,
            "url_fetch": {"enabled": True, "allowed_schemes": ["http"], "allowed_hosts": ["127.0.0.1"], "timeout_s": 5},
            "runtime_modules": ["tests.byo_runtimes"],
            "worker": {
                "num_replicas": 1,
                "num_cpus": 0.5,
                "max_ongoing_requests": 8,
                "torch_threads": 1,
                "load_failure_backoff_s": 5,
                "load_timeout_s": LIMITS_LOAD_TIMEOUT_S,
            },
        },
    )


@pytest.fixture
def authed() -> Iterator[httpx.Client]:
    """A client with the 'limits' app's API key."""
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture
def admin() -> Iterator[httpx.Client]:
    """A client with the 'limits' app's admin key (load and unload)."""
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c
