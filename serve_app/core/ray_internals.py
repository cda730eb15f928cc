"""Every use of Ray Serve's private internals, behind small named functions.

Public APIs are used wherever Ray has one; what is left has no public equivalent in Ray 2.60:

* ``evict_multiplexed_model``: explicit unload, a registry change and a load that makes room take a model
  out of ``@serve.multiplexed``'s LRU cache at once; ``evict_multiplexed_model_between_loads`` once no load
  holds the cache's lock (the router's victims); ``cached_model_ids`` reads the cache's LRU order;
* ``replica_grpc_max_message_bytes``: the cap on messages between replicas in throughput-optimized mode;
* ``grpc_entry_max_message_bytes``: the cap on request messages of Serve's gRPC entry (proxy and ingress
  replicas);
* ``serve_instance_details`` / ``logs_dir``: what the tests read about a running Serve instance;
* ``delete_app_in_background``: the tests remove an app without waiting out its ingress replica's drain.
* ``print_to_files_as_print_does``: Serve's ``print`` in a replica passes a print to a file of its own as one
  tuple, which made every traceback in a replica's log unreadable; the replicas put a correct one in its place.
* ``serve_http_host``: the address the running Serve instance listens on (``http_options.host``), which
  the builder checks against the app's auth settings; ``haproxy_ports``: Ray's defaults for the ports
  HAProxy binds beside it, which ``make run``'s launcher checks before it starts (without importing Ray).
* ``RequestRouter._choose_replica_for_request``: the model workers' router overrides it to learn which
  replica each model's request is sent to, as Serve sends it (``deployments/routing/router.py``);
  ``FIFOMixin._fulfill_next_pending_request``, which hands a chosen replica to a waiting request, so that
  a call for one replica gets that replica and no other (with the queue and the helpers it uses:
  ``_pending_requests_to_fulfill``, ``_cancel_routing_task_for_pending_request``,
  ``_record_queue_wait_time``, ``_remove_pending_request_from_indices``).

The worker replicas and their model status come from the public request-router API instead
(``deployments/routing``): the router's view of the replicas, and calls it sends to one replica by name.

``check()`` verifies that the installed Ray still has each of them; the application builder calls it at
start, and a unit test calls it too, so that a Ray upgrade fails loudly instead of silently (an unload
that never unloads). ``pyproject.toml`` pins Ray to the minor version tested here.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger("ray.serve")

TESTED_RAY_VERSION = "2.60"

# Where @serve.multiplexed keeps its per-replica cache on the instance (ray/serve/api.py).
_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"

# (module, attribute): what this module reaches; instance attributes are looked for in the class's source.
_REQUIRED: list[tuple[str, str]] = [
    ("ray.serve._private.common", "DeploymentID"),
    ("ray.serve._private.constants", "SERVE_CONTROLLER_NAME"),
    ("ray.serve._private.constants", "SERVE_NAMESPACE"),
    ("ray.serve._private.constants", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"),
    ("ray.serve._private.constants", "RAY_SERVE_USE_GRPC_BY_DEFAULT"),
    ("ray.serve._private.constants", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"),
    ("ray.serve._private.controller", "ServeController.get_serve_instance_details"),
    ("ray.serve._private.controller", "ServeController.get_http_config"),
    ("ray.serve._private.constants", "RAY_SERVE_HAPROXY_STATS_PORT"),
    ("ray.serve._private.constants", "RAY_SERVE_HAPROXY_METRICS_PORT"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper.models"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper._model_cache_lock"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper._push_multiplexed_replica_info"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper.registered_model_gauge"),
    ("ray.serve.api", f"multiplexed:{_MULTIPLEX_ATTR}"),
    ("ray.serve.api", "delete:_blocking"),
    ("ray._private.worker", "_global_node"),
    ("ray.serve._private.logging_utils", "redirected_print"),
    ("ray.serve._private.logging_utils", "buildin_print"),
    ("ray.serve._private.constants", "SERVE_LOGGER_NAME"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._choose_replica_for_request"),
    ("ray.serve._private.request_router.request_router", "FIFOMixin._fulfill_next_pending_request"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._pending_requests_to_fulfill"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._pending_requests_by_model_id"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._cancel_routing_task_for_pending_request"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._record_queue_wait_time"),
    ("ray.serve._private.request_router.request_router", "RequestRouter._remove_pending_request_from_indices"),
]


def _has(module_name: str, path: str) -> bool:
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    if ":" in path:  # a string literal the function's source must contain
        func, literal = path.split(":", 1)
        return hasattr(obj, func) and literal in inspect.getsource(getattr(obj, func))
    head, _, attr = path.rpartition(".")
    for part in filter(None, head.split(".")):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    if hasattr(obj, attr):
        return True
    # An instance attribute: set as ``self.<attr>`` in the class's __init__.
    return inspect.isclass(obj) and f"self.{attr}" in inspect.getsource(obj.__init__)


def missing() -> list[str]:
    """The internals this module uses that the installed Ray does not have."""
    return [f"{module}.{path}" for module, path in _REQUIRED if not _has(module, path)]


def check() -> None:
    """Fail with a clear message if the installed Ray lacks an internal this app uses."""
    gone = missing()
    if gone:
        raise RuntimeError(
            f"Ray {ray.__version__} lacks internals this application uses (tested with Ray "
            f"{TESTED_RAY_VERSION}.x): {', '.join(gone)}. Install ray[serve]=={TESTED_RAY_VERSION}.* "
            "or update serve_app/core/ray_internals.py."
        )
    if not ray.__version__.startswith(TESTED_RAY_VERSION + "."):
        logger.warning("Ray %s: this application was tested with Ray %s.x", ray.__version__, TESTED_RAY_VERSION)


# -- the worker's multiplexed model cache ----------------------------------------------------------


def evict_multiplexed_model(
    instance: object, model_id: str, on_evicted: Callable[[Any], None] | None = None, only: object | None = None
) -> Any | None:
    """Take a model out of ``@serve.multiplexed``'s LRU cache on this replica and tell the router at its
    next push; returns the evicted model, or None if the replica does not hold it (or, with ``only``, holds
    another object under that id). Ray has no public API for an explicit unload. The caller frees the model.

    Call it on the replica's event loop. It does not take the cache's lock, which a load holds for as long as
    it runs (a load that hangs, for as long as it hangs): the cache is a dict that only the event loop changes,
    and each of Serve's changes to it (a hit's move to the end, the LRU's pop, a load's insert) is made with no
    await in between, so a pop between two of them is safe. A load under way is not waited for: a registry
    change or an explicit unload takes effect at once, and a load of the same model that starts after it finds
    it gone. From inside a load it makes room (the loader runs under the lock). ``on_evicted`` is told of the
    model at once."""
    wrapper = getattr(instance, _MULTIPLEX_ATTR, None)
    if wrapper is None:  # created lazily on the first load: nothing is held yet
        return None
    if only is not None and wrapper.models.get(model_id) is not only:
        return None
    model = wrapper.models.pop(model_id, None)
    if model is not None:
        _evicted(wrapper, model_id)
        if on_evicted is not None:
            on_evicted(model)
    return model


async def evict_multiplexed_model_between_loads(
    instance: object, model_id: str, on_evicted: Callable[[Any], None] | None = None
) -> Any | None:
    """``evict_multiplexed_model`` once no load holds the cache's lock: the router's victims for a miss, whose
    copies keep serving hits while the load before it runs (evicted at once, they would leave their requests
    to wait behind that load as misses)."""
    wrapper = getattr(instance, _MULTIPLEX_ATTR, None)
    if wrapper is None:
        return None
    async with wrapper._model_cache_lock:
        return evict_multiplexed_model(instance, model_id, on_evicted)


def cached_model_ids(instance: object) -> list[str]:
    """The models ``@serve.multiplexed``'s cache holds on this replica, least recently used first (the order in
    which Ray's LRU evicts them)."""
    wrapper = getattr(instance, _MULTIPLEX_ATTR, None)
    return list(wrapper.models) if wrapper is not None else []


def _evicted(wrapper: Any, model_id: str) -> None:
    """What Serve's own LRU does after an eviction: tell the router at the next push, and set the model's gauge
    on this replica (``serve_registered_multiplexed_model_id``) to 0."""
    wrapper._push_multiplexed_replica_info = True
    wrapper.registered_model_gauge.set(0, tags={"model_id": model_id})


# -- messages between replicas ----------------------------------------------------------------------


def replica_grpc_max_message_bytes() -> int | None:
    """The largest message between replicas when Serve sends them over gRPC (throughput-optimized mode),
    or None when it uses Ray's object transfer, which has no such cap. Read in this process: the
    environment of the whole Ray cluster must agree (config/serve.env sets it for `make run`)."""
    from ray.serve._private import constants

    return constants.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH if constants.RAY_SERVE_USE_GRPC_BY_DEFAULT else None


def grpc_entry_max_message_bytes() -> int:
    """The largest request message Serve's gRPC servers for clients (the proxies', and the ingress replicas' in
    direct-ingress mode) take: grpc refuses a larger one before it is read. Read in this process, like the cap
    above (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, config/serve.env)."""
    from ray.serve._private import constants

    return constants.RAY_SERVE_GRPC_MAX_MESSAGE_SIZE


# -- where Serve listens -----------------------------------------------------------------------------


def serve_http_host(default: str | None) -> str | None:
    """The address the running Serve instance's HTTP entries listen on (its ``http_options.host``: HAProxy,
    the proxies, the ingress replicas' own HTTP servers; None: its HTTP is off), or ``default`` when no Serve
    instance runs yet (or Ray does not: this starts none). Ray has no public API for a running instance's
    HTTP options."""
    if not ray.is_initialized():
        return default
    try:
        controller = _controller()
    except ValueError:  # no Serve controller in this cluster
        return default
    return ray.get(controller.get_http_config.remote()).host


def haproxy_ports() -> dict[str, int]:
    """The ports HAProxy binds on every node beside Serve's HTTP and gRPC ports, by the variable that moves
    each: Ray's defaults, or the values set in this process's environment."""
    from ray.serve._private import constants

    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": constants.RAY_SERVE_HAPROXY_STATS_PORT,
        "RAY_SERVE_HAPROXY_METRICS_PORT": constants.RAY_SERVE_HAPROXY_METRICS_PORT,
    }


def fallback_proxy_ports() -> dict[str, int]:
    """The HTTP and gRPC ports of the proxy Serve runs behind HAProxy on the head node, by the variable that
    moves each: Ray's defaults, or the values set in this process's environment."""
    from ray.serve._private import constants

    return {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": constants.RAY_SERVE_FALLBACK_PROXY_HTTP_PORT,
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": constants.RAY_SERVE_FALLBACK_PROXY_GRPC_PORT,
    }


# -- what the tests read -----------------------------------------------------------------------------


def _controller() -> Any:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def serve_instance_details() -> dict:
    """Serve's full record of applications, deployments and replicas (the data of `serve status`)."""
    return ray.get(_controller().get_serve_instance_details.remote())


def logs_dir() -> Path:
    """This Ray session's log folder (replica logs are under ``serve/``)."""
    return Path(ray._private.worker._global_node.get_logs_dir_path())


def delete_app_in_background(name: str) -> None:
    """Delete a Serve application without waiting for its replicas to stop. In direct-ingress mode an
    ingress replica stays up RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) after it is told to
    stop, so that load balancers stop sending to it; `serve.delete` waits that out unless told not to."""
    from ray import serve

    serve.delete(name, _blocking=False)


# -- a replica's print ------------------------------------------------------------------------------


def serves_replica_print() -> Callable[..., None]:
    """The ``print`` Serve puts in each replica, as Serve wrote it (what ``print_to_files_as_print_does`` replaces;
    for the tests)."""
    from ray.serve._private import logging_utils

    return getattr(logging_utils.redirected_print, "serves", logging_utils.redirected_print)


def print_to_files_as_print_does() -> None:
    """In each replica Serve replaces ``print`` with ``logging_utils.redirected_print``, which sends what is
    printed to stdout or stderr to Serve's logger, and hands a print to any other file to the builtin print as
    one tuple (``print(objects, ...)``, not ``print(*objects, ...)``). Python's traceback module prints each
    line of a traceback to a file of its own that way, and ``logging`` formats every logged exception with it:
    each traceback in a replica's log read ``('Traceback (most recent call last):\n',)('  File ...',)``, on one
    line. This puts a print that does what Serve's means to do in its place, both in ``builtins`` (where Serve's
    is in force) and in Serve's module (which Serve installs again when a deployment's ``logging_config``
    changes); a print already replaced (by this, or by someone else) is left as it is."""
    import builtins
    import sys

    from ray.serve._private import logging_utils
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    serves = logging_utils.redirected_print
    if hasattr(serves, "serves"):  # replaced already
        return
    builtin, serve_logger = logging_utils.buildin_print, logging.getLogger(SERVE_LOGGER_NAME)

    def redirected_print(*objects: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush=False):
        if file not in (sys.stdout, sys.stderr, None):
            return builtin(*objects, sep=sep, end=end, file=file, flush=flush)
        message = (" " if sep is None else sep).join(map(str, objects)) + ("\n" if end is None else end)
        serve_logger.log(logging.INFO, message, stacklevel=2)  # the line that printed, as Serve's print logs it

    redirected_print.serves = serves  # type: ignore[attr-defined]
    logging_utils.redirected_print = redirected_print
    if builtins.print is serves:
        builtins.print = redirected_print
