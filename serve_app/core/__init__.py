"""The shared core: the registry, the typed configuration, the error types, the shared schemas and the
one seam to Ray Serve's internals.

Both deployments import it (``deployments.ingress`` and ``deployments.worker``); it imports neither of
them, and nothing in it imports FastAPI or Starlette, so a worker replica never loads the HTTP stack.
"""
