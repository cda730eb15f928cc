"""The three Ray Serve deployments of the application, its request router, its tasks and what their runtimes
share.

* ``ingress``: the HTTP and gRPC ingress (FastAPI): protocol adapters over one data plane;
* ``worker``: the model workers, each holding at most two models (``@serve.multiplexed``);
* ``registry_check``: one replica that refuses a bad registry before the others apply it;
* ``routing``: the worker replicas' request router (a pure policy and its adapter to Serve);
* ``tasks``: one module per task (its input and output kinds, its runtime classes);
* ``runtimes``: ``ModelRuntime``, the base every runtime subclasses, and what the shipped runtimes share.

The deployments import ``serve_app.core``; none imports another. ``serve_app.app`` binds them.
"""
