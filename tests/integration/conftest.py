"""Integration fixtures: one real Ray instance for the whole test session, apps deployed on it, real HTTP.

Ray starts once (about 25 s on a 2-core machine) and is shut down at the end
of the session, which stops every Ray process it started.
"""

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.paths import PROJECT_ROOT
from tiny_models import write_registry

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url() -> Iterator[str]:
    port = _free_port()
    # Logical CPUs, not cores: several small apps share the machine during the session.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def deploy(serve_url) -> Iterator[Callable[[str, dict], str]]:
    """Deploy an application under /<name> with the given args; returns its base URL."""
    names: list[str] = []

    def _deploy(name: str, args: dict) -> str:
        serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix=f"/{name}")
        names.append(name)
        return f"{serve_url}/{name}"

    yield _deploy
    for name in names:
        serve.delete(name)


@pytest.fixture(scope="session")
def demo_models() -> None:
    """The demo models of the registry, built offline if missing (``make models`` does the same)."""
    from demo.build_models import main

    main([])


@pytest.fixture(scope="session")
def demo_url(deploy, demo_models) -> str:
    """The application exactly as serve_config.yaml configures it."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    return deploy("demo", config["applications"][0]["args"])


@pytest.fixture(scope="session")
def tiny_registry(tiny_dir) -> Path:
    models = {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma", "delta"]}
    models["pixels"] = ("image-classification", tiny_dir / "pixels")
    return write_registry(tiny_dir / "registry.json", models)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c
