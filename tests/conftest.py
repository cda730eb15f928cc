"""Every test session runs in the environment `make run` starts Ray Serve with (config/serve.env): the
same Serve mode, and nothing fetched from a model hub. It is set here, before any test starts Ray, so
that every Ray process inherits it."""

from pathlib import Path

import pytest

from serve_app.devtools import apply_serve_env

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
