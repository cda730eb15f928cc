"""Write deploy/constraints.txt: every package the image installs, pinned to the version the tests ran with.

    .venv/bin/python scripts/image-constraints.py     # after `make install`; commit the file it writes

It walks the requirements of ``multimodel-serve[demo]`` (what deploy/Dockerfile installs) through the
packages installed in this environment, with their markers evaluated for Linux and Python 3.11 (the
image's), and writes ``name==version`` for each. deploy/Dockerfile installs with ``-c`` this file, so the
image gets the versions the tests passed with, not whatever the index offers on the day of the build.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "constraints.txt"
PROJECT, EXTRAS = "multimodel-serve", ("demo",)
# The image's platform: rayproject/ray:<version>-py311-cpu (Ubuntu, x86_64, CPython 3.11).
IMAGE_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def closure() -> dict[str, str]:
    pins: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(PROJECT, EXTRAS)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"{name} is required but not installed here: run `make install` first")
        if canonicalize_name(name) != canonicalize_name(PROJECT):
            pins[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [e for e in ("", *extras)]
            if req.marker and not any(req.marker.evaluate({**IMAGE_ENV, "extra": e}) for e in wanted):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return pins


def main() -> None:
    pins = closure()
    lines = [
        "# Written by scripts/image-constraints.py from the environment the tests ran in; do not edit.",
        "# deploy/Dockerfile installs with `-c` this file; torch is the CPU build from PyTorch's CPU index.",
        *(f"{name}=={version}" for name, version in sorted(pins.items())),
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{OUT.relative_to(ROOT)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
