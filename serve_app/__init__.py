"""multimodel-serve: many Hugging Face models from a small pool of Ray Serve replicas.

``serve_app.core`` is what the ingress and the worker deployments share;
``serve_app.app`` builds the application from both (``deployments/``).
"""
