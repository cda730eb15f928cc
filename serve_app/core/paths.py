"""Where relative paths in the configuration point: the project root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_project_path(path: str | Path) -> Path:
    """An absolute path stays as it is; a relative one is taken from the project root (``~`` expanded)."""
    return resolve_client_path(Path(path).expanduser())


def resolve_client_path(path: str | Path) -> Path:
    """A path a client sent, as ``resolve_project_path`` takes the operator's, but never with ``~`` expanded: a
    client's ``~name/x.jpg`` is a folder named ``~name`` under the project root, so that its answer cannot tell
    whether an account ``name`` exists on the server."""
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p
