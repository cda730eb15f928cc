"""The docs name real things: each test docs/errors-and-limits.md names exists, and each link of the
README and the docs leads to a file (and a page's heading) that exists."""

import re

import pytest

from serve_app.core.paths import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
FOLDERS = {"i": "integration", "u": "unit", "l": "lifecycle", "c": "cluster"}
_FULL = r"\b([iulc])/(test_\w+\.py)::(test_\w+)"


def _named_tests() -> list[tuple[str, str]]:
    """(file, test) for each test docs/errors-and-limits.md names: in its table, ``::name`` alone means the file
    named last in the same cell, or the table's first test file (``test_errors_and_limits.py``) when none came
    before; elsewhere, ``u/test_file.py::name``."""
    named = []
    for line in (DOCS / "errors-and-limits.md").read_text().splitlines():
        if not line.startswith("|"):  # outside the table, only references that name their file
            named += [(f"{FOLDERS[f]}/{file}", name) for f, file, name in re.findall(_FULL, line)]
            continue
        cell = line.rstrip("|").rsplit("|", 1)[-1]
        current = "integration/test_errors_and_limits.py"
        for folder, file, name in re.findall(r"(?:([iulc])/(test_\w+\.py))?::(test_\w+)", cell):
            if file:
                current = f"{FOLDERS[folder]}/{file}"
            named.append((current, name))
    return named


def test_every_test_the_errors_page_names_exists():
    named = _named_tests()
    assert len(named) > 60
    missing = []
    for file, name in named:
        path = PROJECT_ROOT / "tests" / file
        if not path.exists() or not re.search(rf"^(?:async )?def {name}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert missing == []


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(PROJECT_ROOT).as_posix() for p in DOCS.glob("*.md"))]
)
def test_links_between_the_pages_lead_to_a_file_and_a_heading(page):
    path = PROJECT_ROOT / page
    broken = []
    # Every relative link (a page, an image, a file of the repo), and the heading of a page it names.
    for target, anchor in re.findall(r"\]\(((?!https?:|mailto:)[^)#\s]+)?(?:#([\w\-]+))?\)", path.read_text()):
        if not target and not anchor:
            continue
        linked = (path.parent / target).resolve() if target else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
            continue
        if anchor and linked.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
            if anchor not in headings:
                broken.append(f"{target}#{anchor}")
    assert broken == []
