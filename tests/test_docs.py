"""The docs describe the tree as it is: every file the architecture page names exists, and the README stays a
front door that gives a newcomer's two commands and links every page under docs/."""

from __future__ import annotations

import re

from tests.conftest import REPO

PAGES = ("architecture", "configuration", "models", "fleet", "performance", "compat", "structured", "vllm")


def test_every_file_the_architecture_page_names_exists():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:schemas|producer|workers|deploy|tests)/[\w./-]+)`", text))
    assert len(named) > 30, "the page should name the file that owns each step"
    missing = sorted(path for path in named if not (REPO / path.rstrip("/")).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    for page in PAGES:
        assert f"docs/{page}.md" in readme and (REPO / "docs" / f"{page}.md").is_file(), page
    assert not re.search(r"before this round|the issue measured|against the targets", readme + "".join(
        (REPO / "docs" / f"{page}.md").read_text(encoding="utf-8") for page in PAGES), re.IGNORECASE)
