"""A three-node Ray cluster on this machine (ray.cluster_utils.Cluster), started once for this session.

The head node has 1 CPU; two more nodes have 2 CPUs each. Every node is a
real raylet with its own node id, so Serve places and routes replicas across
nodes as it would on separate machines.
"""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from demo.tiny_models import write_registry
from serve_app.app import build_app
from serve_app.core.config import AppArgs
from serve_app.devtools import free_port, no_haproxy_left

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    # The environment of `make run` (config/serve.env, set by tests/conftest.py) reaches every node from here.
    # One addition: Serve reports a replica it cannot place after 1 s instead of 30 (a warning's delay, not
    # a mode), which test_multinode.py reads as the sign that max_replicas_per_node holds.
    os.environ.update({"RAY_SERVE_SLOW_STARTUP_WARNING_S": "1", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        # Ray's shutdown ends Serve's actors, and no_haproxy_left the HAProxy processes: Serve's own shutdown would
        # first wait out the ingress replicas' drain (30 s), for load balancers this session has none of.
        with no_haproxy_left():  # no process of this session outlives it
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="session")
def deploy(cluster_url) -> Callable[[str, dict], str]:
    def _deploy(name: str, args: dict) -> str:
        serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix=f"/{name}")
        return f"{cluster_url}/{name}"

    return _deploy


@pytest.fixture(scope="session")
def tiny_registry(tiny_dir) -> Path:
    models = {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma", "delta"]}
    return write_registry(tiny_dir / "registry.json", models)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c
