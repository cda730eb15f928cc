"""Every test session runs in the environment `make run` starts Ray Serve with (config/serve.env): the
same Serve mode, and nothing fetched from a model hub. It is set here, before any test starts Ray, so
that every Ray process inherits it. The one difference: HAProxy's metrics and stats pages get free ports
instead of their fixed ones, so that the suite can run while `make run` (or another suite) is up."""

import os
from pathlib import Path

import pytest

from serve_app.devtools import apply_serve_env, own_fixed_ports

os.environ.update(own_fixed_ports())
apply_serve_env()

from demo.tiny_models import build_image_model, build_text_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny models: text ``alpha``..``delta`` and image ``pixels``, each with its own label names."""
    base = tmp_path_factory.mktemp("tiny-models")
    for seed, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        build_text_model(base / name, name, seed=seed)
    build_image_model(base / "pixels", "pixels")
    return base
