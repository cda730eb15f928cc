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
    assert _cpus(AppArgs()) <= 2
    assert _cpus(AppArgs.model_validate(_serve_config()["applications"][0]["args"])) <= 2


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValidationError, match="max_replicas must be at least min_replicas"):
        AppArgs.model_validate({"worker": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_batches_must_fit_in_the_ongoing_requests():
    with pytest.raises(ValidationError, match=r"max_ongoing_requests must be at least batching\.max_batch_size"):
        AppArgs.model_validate({"worker": {"max_ongoing_requests": 4, "batching": {"max_batch_size": 8}}})


def test_api_key_from_env_or_file_and_an_empty_file_is_refused(tmp_path, monkeypatch):
    from serve_app.core.config import resolve_api_key

    monkeypatch.delenv("MMS_API_KEY", raising=False)
    assert resolve_api_key(AppArgs()) is None
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert resolve_api_key(AppArgs(api_key_file=str(key_file))) == "s3cret"
    monkeypatch.setenv("MMS_API_KEY", "from-env")
    assert resolve_api_key(AppArgs(api_key_file=str(key_file))) == "from-env"
    monkeypatch.delenv("MMS_API_KEY")
    key_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(AppArgs(api_key_file=str(key_file)))
