"""The layout's rules: a shared core both deployments import, deployments that do not import each other,
one builder that binds them, and a worker that never loads the HTTP stack."""

import ast

import pytest

from serve_app.core import ray_internals
from serve_app.core.paths import PROJECT_ROOT


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _modules(folder: str) -> list:
    return sorted((PROJECT_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("serve_app/core", ("deployments", "fastapi", "starlette")),
        ("deployments/worker", ("deployments.ingress", "fastapi", "starlette")),
        (
            "deployments/runtimes",
            ("deployments.ingress", "deployments.worker", "deployments.tasks", "fastapi", "starlette"),
        ),
        ("deployments/tasks", ("deployments.ingress", "deployments.worker", "fastapi", "starlette")),
        ("deployments/ingress", ("deployments.worker",)),
        ("deployments/routing", ("deployments.ingress", "deployments.worker", "fastapi", "starlette")),
        (
            "deployments/registry_check",
            ("deployments.ingress", "deployments.worker", "deployments.runtimes", "fastapi", "starlette"),
        ),
    ],
)
def test_each_side_imports_only_the_core_and_itself(folder, forbidden):
    for module in _modules(folder):
        bad = {i for i in _imports(module) if any(i == f or i.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{module.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"


def test_the_builder_is_the_only_module_that_imports_both_deployments():
    both = [
        m.relative_to(PROJECT_ROOT).as_posix()
        for m in _modules("serve_app") + _modules("deployments")
        if any(i.startswith("deployments.ingress") for i in _imports(m))
        and any(i.startswith("deployments.worker") for i in _imports(m))
    ]
    assert both == ["serve_app/app.py"]


def test_the_registry_reaches_the_deployments_as_user_config_never_as_a_constructor_argument():
    """A constructor argument that changes restarts the replicas; a user_config that changes reaches them in
    reconfigure. No deployment's constructor takes the registry, and each one that holds it reconfigures."""
    import inspect

    from serve_app import app

    for name in app.REGISTRY_DEPLOYMENTS:
        cls = {d.name: d for d in (app.Ingress, app.ModelWorker, app.RegistryCheck)}[name].func_or_class
        params = inspect.signature(cls.__init__).parameters
        assert not any("registry" in p and p != "registry_check" for p in params), (name, list(params))
        assert inspect.iscoroutinefunction(cls.reconfigure), name  # on the replica's event loop, not a thread


def _project_module_file(name: str):
    path = PROJECT_ROOT / name.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _project_closure(module: str) -> dict[str, set[str]]:
    """Every project module reachable by imports from ``module``, with its own imports."""
    seen: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _project_module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = _imports(path)
        todo += [i for i in seen[name] if i.split(".")[0] in ("serve_app", "deployments")]
    return seen


def test_nothing_the_worker_imports_from_this_project_imports_fastapi_or_starlette():
    # (Ray Serve itself imports them; what matters is that no project module the worker needs does.)
    closure = _project_closure("deployments.worker.deployment")
    assert "serve_app.core.errors" in closure and "deployments.runtimes.base" in closure
    http = {m for m, imports in closure.items() if any(i.split(".")[0] in ("fastapi", "starlette") for i in imports)}
    assert http == set()


def test_ray_internals_are_used_only_through_the_seam():
    users = [
        m.relative_to(PROJECT_ROOT).as_posix()
        for folder in ("serve_app", "deployments", "bench", "demo", "tests")
        for m in _modules(folder)
        if m.name != "ray_internals.py" and "_private" in m.read_text() and m.name != "test_architecture.py"
    ]
    assert users == []


def test_the_installed_ray_has_every_internal_the_seam_uses():
    assert ray_internals.missing() == []
    ray_internals.check()


def test_a_missing_internal_fails_start_up_naming_the_tested_ray(monkeypatch):
    monkeypatch.setattr(ray_internals, "_REQUIRED", [*ray_internals._REQUIRED, ("ray.serve.multiplex", "_Gone.attr")])
    with pytest.raises(RuntimeError, match=rf"tested with Ray {ray_internals.TESTED_RAY_VERSION}\.x.*_Gone\.attr"):
        ray_internals.check()


def _string_constants(path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_a_task_lives_in_its_own_module_and_nowhere_else():
    """The core, the deployments and the routing know no task by name: a new task is one module (listed in
    the app's args), with no edit anywhere else. (tests/integration/test_tasks.py serves one from tests/.)"""
    from serve_app.core.tasks import TaskCatalog

    names = set(TaskCatalog.load().names)
    mentions = {
        m.relative_to(PROJECT_ROOT).as_posix(): sorted(names & _string_constants(m))
        for folder in ("serve_app", "deployments/ingress", "deployments/worker", "deployments/routing")
        for m in _modules(folder)
    }
    assert {m: found for m, found in mentions.items() if found} == {}
    for name in names:
        module = TaskCatalog.load().get(name).runtimes[0].__module__
        assert module.startswith("deployments.tasks.") and name in _string_constants(_project_module_file(module))
