"""
The README's table of contents lists every C{##} and C{###} heading with a
working anchor, and the links between the README and docs/ lead somewhere,
so neither can drift as sections are added or renamed.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def headings(text: str) -> list[tuple[int, str]]:
    """
    (level, title) of every heading outside fenced code blocks.
    """
    found = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            match = re.match(r"(#{1,6}) (.+)$", line)
            if match:
                found.append((len(match.group(1)), match.group(2).strip()))
    return found


def anchors(text: str) -> list[str]:
    """
    The anchors GitHub gives the headings of C{text}: lower case, only
    letters, digits, C{-} and C{_} kept, spaces as C{-}, a repeated one
    numbered.
    """
    seen: dict[str, int] = {}
    result = []
    for _, title in headings(text):
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.append(f"{anchor}-{count}" if count else anchor)
    return result


def links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


class TableOfContentsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.readme = (ROOT / "README.md").read_text()

    def test_everyHeadingListed(self) -> None:
        """
        Every ## and ### heading is in the table of contents, in order, at
        its own depth, linked to its anchor.
        """
        titled = list(zip(headings(self.readme), anchors(self.readme)))
        wanted = [
            ("  " if level == 3 else "") + f"- [{title}](#{anchor})"
            for (level, title), anchor in titled
            if level in (2, 3)
        ]
        self.assertIn("- [The two commands](#the-two-commands)", wanted)
        toc = [line for line in self.readme.splitlines() if re.match(r" *- \[.*\]\(#[^)]*\)$", line)]
        self.assertEqual([line for line in toc if line in wanted], wanted)

    def test_linksWork(self) -> None:
        """
        Every #anchor link of the README, the guide and the reference names
        a heading of the file it points to, and every local file linked
        exists.
        """
        checked = 0
        for name in ("README.md", "docs/guide.md", "docs/reference.md"):
            source = ROOT / name
            for link in links(source.read_text()):
                if re.match(r"[a-z]+:", link):
                    continue
                path, _, anchor = link.partition("#")
                target = (source.parent / path).resolve() if path else source
                self.assertTrue(target.exists(), f"{name}: {link}: no such file")
                if anchor:
                    self.assertIn(anchor, anchors(target.read_text()), f"{name}: {link}: no such heading")
                    checked += 1
        self.assertGreater(checked, 40)

    def test_frontPageLinksDocs(self) -> None:
        """
        The README links the operator's guide and the reference.
        """
        self.assertIn("](docs/guide.md)", self.readme)
        self.assertIn("](docs/reference.md)", self.readme)
