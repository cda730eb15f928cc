"""The registry a replica serves, changed while it runs: shared by the ingress and the worker replicas.

The registry reaches every replica as Ray Serve's ``user_config`` (``registry_user_config``): the builder
sets it from ``config/models.json``, and a deploy whose config changes only the deployments' ``user_config``
(``make reload``, a RayService's ``serveConfigV2``) reaches the running replicas through ``reconfigure``,
without restarting them. Each replica applies it with ``LiveRegistry.apply``:

* a valid registry replaces the one in force at once, and ``apply`` says what changed (``RegistryChange``):
  models added, models whose source, task, runtime or parameters changed (their loaded copies must go),
  models removed;
* a bad one (an invalid field, a duplicate id, a bad path or hub id) is refused whole with the messages of
  start-up: the replica keeps the registry it has and reports the refusal (``RegistryStatus.refused``).
  A replica that has no registry yet (it is starting) has nothing to keep: ``apply`` raises, and the
  replica does not start.

A registry's version is a hash of its content (``content_version``): every replica that runs the same
registry reports the same version, so a rollout is complete when all of them report it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.core.config import RegistryRules
from serve_app.core.registry import ModelSpec, Registry, RegistryError
from serve_app.core.schemas import RefusedRegistry, RegistryStatus
from serve_app.core.tasks import TaskCatalog

logger = logging.getLogger("ray.serve")

REGISTRY_KEY = "registry"
"""The key of the registry's content in a deployment's ``user_config``."""
ORIGIN_KEY = "origin"
"""The key naming where the registry came from (its file), which messages start with."""


def content_version(data: object) -> str:
    """The version of a registry's content: the first 12 hex digits of the SHA-256 of its JSON with sorted
    keys and no spaces, so that the layout of the file (indentation, key order) does not count."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def registry_user_config(data: object, origin: str) -> dict[str, Any]:
    """The ``user_config`` that carries a registry's content (``{"models": [...]}``) to the replicas."""
    return {REGISTRY_KEY: data, ORIGIN_KEY: origin}


def parse_user_config(
    user_config: object, catalog: TaskCatalog | None = None, budget_bytes: int | None = None
) -> tuple[Registry, str]:
    """The registry a ``user_config`` carries and its version; ``RegistryError`` with start-up's messages
    (each names its field) if it is not a valid registry for ``catalog`` (default: the shipped tasks) and the
    replicas' model budget."""
    if not isinstance(user_config, Mapping) or REGISTRY_KEY not in user_config:
        raise RegistryError(
            f"user_config: no {REGISTRY_KEY!r} key: the registry reaches the replicas as "
            f'{{"{REGISTRY_KEY}": {{"models": [...]}}}} (make reload writes it)'
        )
    data = user_config[REGISTRY_KEY]
    origin = str(user_config.get(ORIGIN_KEY) or "registry")
    return Registry.from_dict(data, origin=origin, catalog=catalog, budget_bytes=budget_bytes), content_version(data)


def same_model(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether a loaded copy of ``old`` can serve as ``new``: the same files, task, runtime class and runtime
    parameters (a changed description, labels or preload flag keeps the copy)."""
    return (old.task, old.source, old.runtime, old.parameters) == (new.task, new.source, new.runtime, new.parameters)


@dataclass(frozen=True)
class RegistryChange:
    """What one applied registry changed, by model id (each list in the new, or old, registry's order)."""

    version: str
    previous: str | None = None
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # files, task, runtime or parameters changed: copies must go
    removed: list[str] = field(default_factory=list)

    @property
    def stale(self) -> list[str]:
        """The models whose loaded copies no longer serve: changed or removed."""
        return [*self.changed, *self.removed]

    def describe(self) -> str:
        parts = [f"{name} {', '.join(ids)}" for name, ids in self._parts() if ids]
        return f"registry {self.previous} -> {self.version}: " + ("; ".join(parts) or "no model changed")

    def _parts(self) -> list[tuple[str, list[str]]]:
        return [("added", self.added), ("changed", self.changed), ("removed", self.removed)]


def diff(old: Registry | None, new: Registry, version: str, previous: str | None = None) -> RegistryChange:
    """What goes from ``old`` to ``new`` (everything is added when there is no old one)."""
    if old is None:
        return RegistryChange(version=version, previous=previous, added=new.ids)
    return RegistryChange(
        version=version,
        previous=previous,
        added=[m for m in new.ids if m not in old],
        changed=[m for m in new.ids if m in old and not same_model(old.get(m), new.get(m))],
        removed=[m for m in old.ids if m not in new],
    )


class LiveRegistry:
    """One replica's registry: the one in force, when it was applied, the last refusal since, and every
    version this replica has run."""

    def __init__(self, catalog: TaskCatalog | None = None, budget_bytes: int | None = None) -> None:
        self.catalog = catalog if catalog is not None else TaskCatalog.load()
        self.budget_bytes = budget_bytes  # a worker replica's model budget: larger declared sizes are refused
        self._registry: Registry | None = None
        self.version: str | None = None
        self.applied_at: float | None = None
        self.refused: RefusedRegistry | None = None
        self._seen: set[str] = set()
        self._next = asyncio.Event()  # set by the next apply, then replaced

    @classmethod
    def from_rules(cls, rules: RegistryRules | None) -> LiveRegistry:
        """A replica's live registry under the app's rules (its tasks, runtime modules and model budget)."""
        rules = rules or RegistryRules()
        return cls(rules.catalog(), rules.model_budget_bytes)

    @property
    def registry(self) -> Registry:
        """The registry in force; ``RegistryError`` before the first one is applied."""
        if self._registry is None:
            raise RegistryError("no registry applied yet")
        return self._registry

    @property
    def ready(self) -> bool:
        return self._registry is not None

    def has_run(self, version: str) -> bool:
        """Whether this replica has run that version (now or before)."""
        return version in self._seen

    def behind(self, version: str, applied_at: float | None = None) -> bool:
        """Whether a request sent under ``version``, which its sender applied at ``applied_at``, was sent under a
        registry this replica has yet to apply: one it has never run, or one it ran before its current one that
        its sender applied after this replica applied its current one (a change reverted, A to B and back to
        A, whose versions are the same content hash: the sender is on the revert)."""
        if version == self.version:
            return False
        if not self.has_run(version):
            return True
        return applied_at is not None and self.applied_at is not None and applied_at > self.applied_at

    def apply(self, user_config: object) -> RegistryChange | None:
        """Apply a registry from ``user_config``: what changed, or None if it was refused (this replica keeps
        its registry). Raises ``RegistryError`` when there is no registry to keep. Synchronous, with no
        await: no request sees half of a change."""
        return self._commit(user_config, self._check(user_config))

    async def apply_checked_off_loop(self, user_config: object) -> RegistryChange | None:
        """``apply``, with the registry checked on a thread: a registry of thousands of entries takes seconds
        to validate, and its checks read the disk (the model roots), which a replica's event loop must not
        wait for. Only the change itself runs on the loop, with no await: no request sees half of it."""
        return self._commit(user_config, await asyncio.to_thread(self._check, user_config))

    def _check(self, user_config: object) -> tuple[Registry, str] | RegistryError:
        try:
            return parse_user_config(user_config, self.catalog, self.budget_bytes)
        except RegistryError as e:
            return e

    def _commit(self, user_config: object, checked: tuple[Registry, str] | RegistryError) -> RegistryChange | None:
        if isinstance(checked, RegistryError):
            if self._registry is None:
                raise checked
            data = user_config.get(REGISTRY_KEY) if isinstance(user_config, Mapping) else user_config
            self.refused = RefusedRegistry(version=content_version(data), message=str(checked), at=time.time())
            logger.error("registry change refused, still serving registry %s:\n%s", self.version, checked)
            self._notify()
            return None
        new, version = checked
        change = diff(self._registry, new, version, previous=self.version)
        if version != self.version:
            self.applied_at = time.time()
        self._registry, self.version, self.refused = new, version, None
        self._seen.add(version)
        logger.info("%s", change.describe())
        self._notify()
        return change

    def status(self) -> RegistryStatus:
        return RegistryStatus(
            version=self.version,
            applied_at=self.applied_at,
            models=len(self._registry.models) if self._registry else 0,
            refused=self.refused,
        )

    def _notify(self) -> None:
        self._next.set()
        self._next = asyncio.Event()

    async def wait_for_change(self, timeout_s: float) -> bool:
        """Wait until the next ``apply`` (applied or refused), at most ``timeout_s``; whether one came.
        (``apply`` runs on the replica's event loop: both deployments' ``reconfigure`` are coroutines.)"""
        try:
            await asyncio.wait_for(self._next.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
