"""The two Ray Serve deployments of the application, and the model runtimes the worker runs.

* ``ingress``: the HTTP ingress (FastAPI): protocol adapters over one data plane;
* ``worker``: the model workers, each holding at most two models (``@serve.multiplexed``);
* ``runtimes``: one model runtime per task, behind one small interface.

Both deployments import ``serve_app.core``; neither imports the other. ``serve_app.app`` binds them.
"""
