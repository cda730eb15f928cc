import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
sys.path.insert(0, str(ROOT))  # demo/

# Nothing is ever fetched from a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from demo.tiny_models import build_image_model, build_text_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny models: text ``alpha``..``delta`` and image ``pixels``, each with its own label names."""
    base = tmp_path_factory.mktemp("tiny-models")
    for seed, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        build_text_model(base / name, name, seed=seed)
    build_image_model(base / "pixels", "pixels")
    return base
