import os
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from serve_app.core.config import AppArgs
from serve_app.core.paths import PROJECT_ROOT


def _serve_config() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())


def test_serve_config_names_the_builder_and_its_args_validate():
    app = _serve_config()["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.worker.num_replicas >= 1
    # every field in the file is a field of AppArgs (extra fields are rejected)
    assert set(app["args"]) <= set(AppArgs.model_fields)


def test_builder_is_importable_and_typed():
    import importlib
    import inspect

    module, name = _serve_config()["applications"][0]["import_path"].split(":")
    build = getattr(importlib.import_module(module), name)
    assert inspect.signature(build).parameters["args"].annotation in (AppArgs, "AppArgs")


@pytest.mark.parametrize(
    "args, field",
    [
        ({"worker": {"num_replicas": 0}}, "worker.num_replicas"),
        ({"worker": {"replicas": 2}}, "worker.replicas"),
        ({"request_timeout_s": -1}, "request_timeout_s"),
        ({"registry": "x.json"}, "registry"),
    ],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(args)
    assert field in {".".join(map(str, err["loc"])) for err in e.value.errors()}


def _cpus(args: AppArgs) -> float:
    w, i = args.worker, args.ingress
    most = w.autoscaling.max_replicas if w.autoscaling else w.num_replicas
    return most * w.num_cpus + i.num_replicas * i.num_cpus


def test_defaults_and_serve_config_fit_a_two_core_machine():
    assert _cpus(AppArgs(auth={"mode": "off"})) <= 2
    assert _cpus(AppArgs.model_validate(_serve_config()["applications"][0]["args"])) <= 2


@pytest.mark.parametrize("source", ["serve_config.yaml", "defaults"])
def test_the_worker_replicas_take_every_request_the_ingress_takes_at_once(source):
    """With fewer slots, a request beyond them waits in the router, which asks again only after a back-off
    (up to 0.5 s) while a slot may be free: measured at 64 clients on one model, 0.90x the 16-client rate
    with 16 slots a replica, against 1.10x and 1.33x with 32 (docs/performance.md). The RayService's worker
    and ingress args are serve_config.yaml's (test_deploy_manifests.py checks that they differ only in
    K8S_ONLY's fields)."""
    if source == "defaults":
        args = AppArgs.model_validate({"auth": {"mode": "off"}})
    else:
        args = AppArgs.model_validate(_serve_config()["applications"][0]["args"])
    w = args.worker
    fewest = w.autoscaling.min_replicas if w.autoscaling is not None else w.num_replicas
    assert fewest * w.max_ongoing_requests >= args.ingress.num_replicas * args.ingress.max_ongoing_requests


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValidationError, match="max_replicas must be at least min_replicas"):
        AppArgs.model_validate({"worker": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_batches_must_fit_in_the_ongoing_requests():
    with pytest.raises(ValidationError, match=r"max_ongoing_requests must be at least batching\.max_batch_size"):
        AppArgs.model_validate({"worker": {"max_ongoing_requests": 4, "batching": {"max_batch_size": 8}}})


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv("MMS_API_KEY", raising=False)
    monkeypatch.delenv("MMS_ADMIN_KEY", raising=False)
    return monkeypatch


def _auth(**fields):
    from serve_app.core.config import AuthArgs

    return AuthArgs(**fields)


def test_auth_is_a_required_and_explicit_choice():
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate({})
    assert "auth" in {err["loc"][0] for err in e.value.errors()}
    with pytest.raises(ValidationError, match="api_key"):
        AppArgs.model_validate({"auth": {"mode": "maybe"}})


def test_keys_from_env_or_file_and_an_empty_file_is_refused(tmp_path, no_key_env):
    from serve_app.core.config import AuthConfigError, resolve_keys

    assert not resolve_keys(_auth(mode="off")).on
    key_file, admin_file = tmp_path / "key", tmp_path / "admin"
    key_file.write_text("s3cret\n")
    admin_file.write_text("admin-s3cret")
    keys = resolve_keys(_auth(mode="api_key", api_key_file=str(key_file), admin_key_file=str(admin_file)))
    assert (keys.api, keys.admin) == (b"s3cret", b"admin-s3cret")
    no_key_env.setenv("MMS_API_KEY", "from-env")
    keys = resolve_keys(_auth(mode="api_key", api_key_file=str(key_file), admin_key_file=str(admin_file)))
    assert keys.api == b"from-env"
    no_key_env.delenv("MMS_API_KEY")
    key_file.write_text("  \n")
    with pytest.raises(AuthConfigError, match="is empty"):
        resolve_keys(_auth(mode="api_key", api_key_file=str(key_file), admin_key_file=str(admin_file)))


def test_an_empty_or_missing_key_stops_start_up_instead_of_turning_auth_off(tmp_path, no_key_env):
    from serve_app.core.config import AuthConfigError, resolve_keys

    no_key_env.setenv("MMS_API_KEY", "")
    no_key_env.setenv("MMS_ADMIN_KEY", "admin")
    with pytest.raises(AuthConfigError, match="MMS_API_KEY is set but empty"):
        resolve_keys(_auth(mode="api_key"))
    no_key_env.delenv("MMS_API_KEY")
    with pytest.raises(AuthConfigError, match="no api key is set"):
        resolve_keys(_auth(mode="api_key"))
    no_key_env.setenv("MMS_API_KEY", "admin")
    with pytest.raises(AuthConfigError, match="must differ"):
        resolve_keys(_auth(mode="api_key"))


def test_a_key_set_while_auth_is_off_is_logged_as_ignored(no_key_env, caplog):
    from serve_app.core.config import resolve_keys

    no_key_env.setenv("MMS_API_KEY", "s3cret")
    assert not resolve_keys(_auth(mode="off")).on
    assert "auth.mode is off: MMS_API_KEY is set and ignored" in caplog.text


def test_start_up_refuses_limits_that_messages_between_replicas_cannot_carry(monkeypatch):
    from serve_app.app import build_app
    from serve_app.core import ray_internals

    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: "127.0.0.1")  # serve_config.yaml's
    monkeypatch.setattr(ray_internals, "replica_grpc_max_message_bytes", lambda: 4 * 1024 * 1024)  # Ray's default
    with pytest.raises(ValueError, match="RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"):
        build_app(AppArgs(auth={"mode": "off"}))  # 8 MiB of inputs do not fit 4 MiB
    small = {"max_body_bytes": 1024 * 1024, "max_image_bytes": 1024 * 1024, "max_text_chars": 10_000}
    assert build_app(AppArgs(auth={"mode": "off"}, **small))


def test_a_worker_replica_that_serve_stops_may_finish_any_request_it_runs():
    """A scale-down or a redeploy stops a worker replica once its requests are done, or after Serve's grace
    period: longer than any request may run, so that none that could still be answered is cut off."""
    from tests.helpers import built_on_the_loopback

    args = AppArgs(auth={"mode": "off"}, request_timeout_s=90, max_body_bytes=1 << 20, max_image_bytes=1 << 20)
    (worker, _check, _args) = built_on_the_loopback(args)._bound_deployment.init_args
    assert worker._bound_deployment._deployment_config.graceful_shutdown_timeout_s > args.request_timeout_s


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.0.2.2", False),
        ("fd00::2", False),
        ("myhost", False),
    ],
)
def test_only_loopback_addresses_count_as_this_machine_alone(host, loopback):
    from serve_app.core.config import is_loopback

    assert is_loopback(host) is loopback


def test_auth_off_is_refused_on_any_address_but_the_loopback_in_one_line():
    from serve_app.core.config import listen_refusal

    off, on = _auth(mode="off"), _auth(mode="api_key")
    assert listen_refusal("127.0.0.1", off) is None
    assert listen_refusal(None, off) is None  # not known yet: the builder checks once Serve runs
    assert listen_refusal("0.0.0.0", on) is None
    refusal = listen_refusal("0.0.0.0", off)
    assert "\n" not in refusal and "'0.0.0.0'" in refusal and "auth.mode: api_key" in refusal


def test_the_builder_refuses_auth_off_when_serve_listens_on_another_address(monkeypatch):
    import ray

    from serve_app.app import build_app
    from serve_app.core import ray_internals

    if not ray.is_initialized():
        assert ray_internals.serve_http_host(default="x") == "x"  # no Serve to ask, and none is started to ask it
    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: "0.0.0.0")
    with pytest.raises(ValueError, match=r"^refusing to start: auth.mode is off and http_options.host is '0.0.0.0'"):
        build_app(AppArgs(auth={"mode": "off"}))
    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: "127.0.0.1")
    assert build_app(AppArgs(auth={"mode": "off"}))
    # An empty host is every interface (HAProxy writes `bind :8000`), not an unknown one.
    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: "")
    with pytest.raises(ValueError, match=r"http_options\.host is ''"):
        build_app(AppArgs(auth={"mode": "off"}))
    # A Serve instance with its HTTP off listens on no address.
    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: None)
    assert build_app(AppArgs(auth={"mode": "off"}))
    # No Serve yet: serve.run will start one on Ray's default address, which the environment can move.
    monkeypatch.setattr(ray_internals, "serve_http_host", lambda default: default)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.delenv("RAY_SERVE_DEFAULT_HTTP_HOST", raising=False)
    assert build_app(AppArgs(auth={"mode": "off"}))
    monkeypatch.setenv("RAY_SERVE_DEFAULT_HTTP_HOST", "0.0.0.0")
    with pytest.raises(ValueError, match=r"http_options\.host is '0\.0\.0\.0'"):
        build_app(AppArgs(auth={"mode": "off"}))
    # With HAProxy (config/serve.env), Ray listens on every interface whatever RAY_SERVE_DEFAULT_HTTP_HOST says.
    monkeypatch.setenv("RAY_SERVE_DEFAULT_HTTP_HOST", "127.0.0.1")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with pytest.raises(ValueError, match=r"http_options\.host is '0\.0\.0\.0'"):
        build_app(AppArgs(auth={"mode": "off"}))


@pytest.mark.parametrize(
    "environ",
    [{}, {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DEFAULT_HTTP_HOST": "127.0.0.1"}],
    ids=["plain", "haproxy"],
)
def test_the_default_address_is_the_one_ray_listens_on(environ):
    # Ray reads its environment once, at import: a process of its own for each.
    from serve_app.core.config import default_http_host, is_loopback

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | environ
    code = "from ray.serve.config import HTTPOptions; print(HTTPOptions().host)"
    ray_default = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert is_loopback(default_http_host(env)) == is_loopback(ray_default), (default_http_host(env), ray_default)


def test_serve_config_listens_on_the_loopback_with_auth_off():
    from serve_app.core.config import listen_refusal

    config = _serve_config()
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert (config["http_options"]["host"], args.auth.mode) == ("127.0.0.1", "off")
    assert listen_refusal(config["http_options"]["host"], args.auth) is None


def test_the_shipped_environment_carries_the_largest_request(monkeypatch):
    from serve_app.devtools import serve_env

    args = AppArgs.model_validate(_serve_config()["applications"][0]["args"])
    assert args.largest_worker_message() <= int(serve_env()["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])


def _fields(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        out += _fields(sub, f"{prefix}{name}.") if sub and hasattr(sub, "model_fields") else [prefix + name]
    return out


def test_every_argument_is_documented():
    doc = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    missing = [f for f in _fields(AppArgs) if f"`{f}`" not in doc and f"`{f}." not in doc]
    assert missing == [], f"docs/configuration.md has no row for {missing}"


@pytest.mark.parametrize(
    "args, field",
    [
        ({"body_timeout_s": float("inf")}, "body_timeout_s"),
        ({"request_timeout_s": float("inf")}, "request_timeout_s"),
        ({"worker": {"load_failure_backoff_s": float("inf")}}, "worker.load_failure_backoff_s"),
        ({"worker": {"load_failure_backoff_s": float("nan")}}, "worker.load_failure_backoff_s"),
    ],
)
def test_an_infinite_or_nan_setting_is_refused(args, field):
    """YAML's .inf would turn a guard off: a slow sender never cut, a failed model never tried again."""
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(args)
    assert ("finite_number", field) in {(err["type"], ".".join(map(str, err["loc"]))) for err in e.value.errors()}
