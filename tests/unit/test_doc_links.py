"""Every relative link of the documentation leads somewhere: its file exists and, when it names an
anchor, a heading of that file has it (GitHub's rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "deploy" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation but - and _ dropped,
    spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def outside_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; GitHub suffixes repeated ones with -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S).splitlines():
        if match := re.match(r"#{1,6} (.+?)\s*#*\s*$", line):
            anchor = github_anchor(match.group(1))
            found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
            seen[anchor] = seen.get(anchor, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of one markdown file whose target file or heading does not exist."""
    broken = []
    for target in LINK.findall(outside_code(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    return broken


def test_anchors_follow_githubs_rules() -> None:
    assert github_anchor("Labels: the contract") == "labels-the-contract"
    notify = "`anomaly-notify`: anomalies reach people"
    assert github_anchor(notify) == "anomaly-notify-anomalies-reach-people"


def test_a_missing_heading_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n[b](b.md#nowhere) [c](c.md) [self](#a) [ok](b.md#b-c)\n")
    (tmp_path / "b.md").write_text("# B: c\n")
    assert broken_links(tmp_path / "a.md") == ["b.md#nowhere: no such heading", "c.md: no such file"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(path: Path) -> None:
    assert broken_links(path) == []
