import json

import pytest

from serve_app.core.errors import ModelNotFound
from serve_app.core.registry import HubSource, LocalSource, Registry, RegistryError
from serve_app.core.tasks import TaskCatalog

GOOD = {
    "models": [
        {
            "id": "sentiment",
            "task": "text-classification",
            "source": {"path": "models/sentiment"},
            "description": "d",
            "labels": ["negative", "positive"],
        },
        {
            "id": "vit",
            "task": "image-classification",
            "source": {"hub_id": "google/vit-base-patch16-224", "revision": "3f49326eb077187dfe1c2a2bb15fbd74e6ab91e3"},
        },
    ]
}


def _with(index: int, **changes):
    data = json.loads(json.dumps(GOOD))
    data["models"][index].update(changes)
    return data


def test_valid_registry_loads_with_both_source_kinds():
    reg = Registry.from_dict(GOOD)
    assert reg.ids == ["sentiment", "vit"]
    assert isinstance(reg.get("sentiment").source, LocalSource)
    assert isinstance(reg.get("vit").source, HubSource)
    assert reg.get("vit").task == "image-classification" and reg.get("sentiment").task == "text-classification"


def test_shipped_registry_is_valid():
    reg = Registry.from_file("config/models.json")
    assert set(reg.ids) == {"sentiment", "spam", "image", "embed", "ner", "image-embed"}
    assert {m.task for m in reg.models} == set(TaskCatalog.load().names)  # a demo model for every shipped task


def test_unknown_model_lists_known_ids():
    with pytest.raises(ModelNotFound) as e:
        Registry.from_dict(GOOD).get("nope")
    assert e.value.status_code == 404
    assert e.value.details["known_models"] == ["sentiment", "vit"]
    assert "sentiment" in e.value.message and "vit" in e.value.message


@pytest.mark.parametrize(
    "data, field",
    [
        (_with(0, task="translation"), "models.0.task"),
        (_with(0, id=""), "models.0.id"),
        (_with(0, id="has space"), "models.0.id"),
        (_with(1, source={"hub_id": "google/vit-base-patch16-224"}), "models.1.source"),
        (_with(1, source={"hub_id": "google/vit", "revision": "main"}), "revision"),
        (_with(1, source={"hub_id": "models/..", "revision": "0" * 40}), "models.1.source"),
        (_with(0, trust_remote_code=True), "models.0.trust_remote_code"),
        (_with(0, labels="positive"), "models.0.labels"),
        (_with(0, runtime="not a path"), "models.0.runtime"),
        (_with(0, runtime="os:system"), "models.0.runtime"),
        (_with(0, parameters="x"), "models.0.parameters"),
        ({"models": []}, "models"),
        ({}, "models"),
    ],
)
def test_bad_registry_is_rejected_naming_the_field(data, field):
    with pytest.raises(RegistryError) as e:
        Registry.from_dict(data, origin="models.json")
    assert field in str(e.value)
    assert str(e.value).startswith("models.json: ")


def test_missing_source_is_named():
    data = _with(0)
    del data["models"][0]["source"]
    with pytest.raises(RegistryError, match=r"models\.0\.source: Field required"):
        Registry.from_dict(data)


def test_duplicate_ids_rejected():
    data = {"models": [GOOD["models"][0], GOOD["models"][0]]}
    with pytest.raises(RegistryError, match="duplicate model id 'sentiment'"):
        Registry.from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(RegistryError, match="registry file not found"):
        Registry.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RegistryError, match=f"{bad}: not valid JSON"):
        Registry.from_file(bad)


def test_relative_local_path_resolves_from_project_root():
    from serve_app.core.paths import PROJECT_ROOT

    ref, revision = Registry.from_dict(GOOD).get("sentiment").source.reference()
    assert ref == str(PROJECT_ROOT / "models/sentiment") and revision is None
    assert Registry.from_dict(GOOD).get("vit").source.reference() == (
        "google/vit-base-patch16-224",
        "3f49326eb077187dfe1c2a2bb15fbd74e6ab91e3",
    )


def test_an_unknown_task_is_refused_naming_the_tasks_the_app_serves():
    with pytest.raises(RegistryError) as e:
        Registry.from_dict(_with(0, task="translation"), origin="models.json")
    message = str(e.value)
    assert message.startswith("models.json: models.0.task: unknown task 'translation'")
    assert all(repr(name) in message for name in TaskCatalog.load().names)
    assert message.endswith(f"(model {GOOD['models'][0]['id']!r})")  # the entry, by its id as well


def test_the_tasks_are_the_catalogs_the_app_is_configured_with():
    only_text = TaskCatalog.load(["deployments.tasks.text_classification"])
    with pytest.raises(RegistryError, match=r"models\.1\.task: unknown task 'image-classification'"):
        Registry.from_dict(GOOD, catalog=only_text)
    assert Registry.from_dict(_with(1, task="text-classification"), catalog=only_text).ids == ["sentiment", "vit"]


def test_a_runtime_class_must_come_from_an_allowed_module():
    """The registry (which changes live) may name a runtime class only from a task module or a module the
    operator lists in args.runtime_modules; it cannot widen that list."""
    own = "tests.unit.fixtures_runtimes:Echo"
    with pytest.raises(
        RegistryError,
        match=r"models\.0\.runtime: runtime 'tests\.unit\.fixtures_runtimes:Echo'.*"
        r"not in args\.runtime_modules",
    ):
        Registry.from_dict(_with(0, runtime=own))
    allowed = TaskCatalog.load(runtime_modules=["tests.unit.fixtures_runtimes"])
    assert Registry.from_dict(_with(0, runtime=own), catalog=allowed).get("sentiment").runtime == own
    shipped = "deployments.tasks.text_classification:TextClassificationRuntime"  # a task module's: allowed
    assert Registry.from_dict(_with(0, runtime=shipped)).get("sentiment").runtime == shipped


def test_a_declared_size_over_a_replicas_model_budget_refuses_the_registry():
    """worker.memory_bytes less worker.baseline_bytes is what a replica's models may take: a model declared
    larger can never be loaded, and the registry naming it is refused whole, as for any bad entry."""
    from serve_app.core.config import AppArgs
    from serve_app.core.live_registry import LiveRegistry, registry_user_config

    args = AppArgs.model_validate(
        {"auth": {"mode": "off"}, "worker": {"memory_bytes": 2 << 30, "baseline_bytes": 1 << 30}}
    )
    rules = args.registry_rules
    assert rules.model_budget_bytes == 1 << 30
    fits, too_big = _with(0, memory_bytes=1 << 30), _with(0, memory_bytes=(1 << 30) + 1)
    assert Registry.from_dict(fits, budget_bytes=rules.model_budget_bytes).get("sentiment").memory_bytes == 1 << 30
    with pytest.raises(RegistryError, match=rf"models\.0\.memory_bytes: a copy of {(1 << 30) + 1} bytes can never"):
        Registry.from_dict(too_big, origin="models.json", budget_bytes=rules.model_budget_bytes)
    live = LiveRegistry.from_rules(rules)
    good = live.apply(registry_user_config(fits, origin="models.json"))
    assert live.apply(registry_user_config(too_big, origin="models.json")) is None  # refused: the old one serves
    assert live.version == good.version and "can never be loaded" in live.status().refused.message
    assert Registry.from_dict(too_big).get("sentiment").memory_bytes  # no budget (count only): any size is taken


def test_with_a_gpu_a_declared_size_is_counted_against_the_device_memory_where_the_models_go():
    from serve_app.core.config import AppArgs

    def budget(**worker):
        return AppArgs.model_validate({"auth": {"mode": "off"}, "worker": worker}).registry_rules.model_budget_bytes

    host = {"memory_bytes": 2 << 30, "baseline_bytes": 1 << 30}
    assert budget(**host) == 1 << 30
    assert budget(**host, num_gpus=1, gpu_memory_bytes=3 << 30) == 3 << 30
    assert budget(**host, num_gpus=1) is None  # the device's memory: measured by each replica at start


@pytest.mark.parametrize(
    "path", ["../../../../etc", "/etc", "models", "models/x/../../config", "samples/images", "models/../models/../x"]
)
def test_a_local_source_out_of_the_model_roots_is_refused(path):
    with pytest.raises(RegistryError, match=r"models\.0\.source: path .* is outside the model roots"):
        Registry.from_dict(_with(0, source={"path": path}))


def test_the_model_roots_are_the_operators_and_links_out_of_them_are_refused(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "m").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    catalog = TaskCatalog.load(model_roots=[str(root)])
    ok = Registry.from_dict(_with(0, source={"path": str(root / "m")}), catalog=catalog)
    assert ok.get("sentiment").source.path == str(root / "m")
    for path in (str(root / "link"), str(elsewhere), "models/sentiment"):
        with pytest.raises(RegistryError, match="outside the model roots"):
            Registry.from_dict(_with(0, source={"path": path}), catalog=catalog)
    # A spec built in code (no registry read) is not checked: the tests' and the worker's own.
    from serve_app.core.registry import ModelSpec

    assert ModelSpec(id="m", task="text-classification", source={"path": "/anywhere"}).source.path == "/anywhere"


def test_a_hub_id_that_also_names_a_folder_of_the_server_is_not_read_from_it(tmp_path, monkeypatch):
    """transformers reads a hub id that names a folder of the working directory from that folder, whatever the
    revision: a way around the model roots. Such a source fails its load, saying why."""
    (tmp_path / "samples" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    source = Registry.from_dict(_with(1, source={"hub_id": "samples/images", "revision": "0" * 40})).get("vit").source
    with pytest.raises(ValueError, match="'samples/images' also names a folder of the server"):
        source.reference()
    assert HubSource(hub_id="google/vit", revision="0" * 40).reference() == ("google/vit", "0" * 40)


def test_a_model_folder_with_a_subfolder_that_cannot_be_listed_is_refused_at_load(tmp_path, monkeypatch):
    """Its links could not be checked, while the loader may still open a file in it by name."""
    import os

    root = tmp_path / "root"
    (root / "m" / "hid").mkdir(parents=True)
    catalog = TaskCatalog.load(model_roots=[str(root)])
    assert catalog.check_files(str(root / "m")) is None
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("hid"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert "has a folder that cannot be listed: PermissionError" in catalog.check_files(str(root / "m"))
    assert catalog.check_files(str(root / "missing")) is None  # no folder: the load says its files are missing
