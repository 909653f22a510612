"""Every relative link of the README and docs/ points at a file or folder of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    broken, checked = [], 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = target.split("#", 1)[0]
            checked += 1
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == [] and checked >= 3


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # a '#' in a code block is no heading
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_anchors_of_links_between_pages_resolve():
    broken, checked = [], 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            dest = (page.parent / path) if path else page
            if dest.suffix != ".md" or not dest.exists():
                continue  # a missing file is test_relative_links_resolve's to report
            checked += 1
            if anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == [] and checked >= 3


def test_readme_is_short_and_every_docs_page_is_linked():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250, "README.md is over 250 lines: move the detail into docs/"
    linked = set()
    for page in (readme, ROOT / "docs" / "README.md"):
        for target in LINK.findall(page.read_text()):
            if not re.match(r"[a-z]+:", target):
                linked.add((page.parent / target.split("#", 1)[0]).resolve())
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md"]
    assert len(pages) >= 5
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_the_readme_layout_names_every_preset():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in sorted((ROOT / "configs").glob("*.toml")) if f"  {p.name} " not in readme] == []
