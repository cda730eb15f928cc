"""The shared core: the registry, the typed configuration, the error types, the shared schemas and the
one seam to Ray Serve's internals.

The deployments import it (``deployments.ingress``, ``deployments.worker``, ``deployments.registry_check``);
it imports none of them, and nothing in it imports FastAPI or Starlette, so a worker replica never loads the HTTP stack.
"""
