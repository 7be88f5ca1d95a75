"""Every document that the code, the ``--help`` texts and the docs name exists in the repository,
and the sdist carries it.

Truth: the files on disk. Every ``*.md`` path named in src/, docs/*.md, README.md, CHANGELOG.md
and the help of every ``guided-nc`` command is resolved the way a reader would (``docs/x.md``
from the repository root; ``x.md`` or ``results/y/x.md`` from docs/, else from the root) and must
be a file. Names of files that the commands *write* (report.md, ...) are outputs, not documents,
unless the path points into the repository (``docs/results/...``). The checker is first shown to
catch a missing document on made-up text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from guided_nc.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: A path ending in .md: letters, digits, ``_ - . /`` (no spaces), as written in text and code.
REFERENCE = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]+\.md\b")

#: Files the commands write into their output folders (named in help texts and docstrings as
#: ``OUT/report.md`` and the like); each must appear as a string literal in the package.
OUTPUT_NAMES = {"report.md", "tables.md", "device_check.md"}


def help_texts() -> str:
    """The ``--help`` of ``guided-nc`` and of every subcommand, nested ones included."""
    texts = []
    pending = [build_parser()]
    while pending:
        parser = pending.pop()
        texts.append(parser.format_help())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return "\n".join(texts)


def sources() -> dict[str, str]:
    """``{where: text}`` of everything that may name a document."""
    files = [*sorted((ROOT / "src").rglob("*.py")), *sorted(DOCS.glob("*.md"))]
    files += [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    texts = {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8") for path in files}
    texts["guided-nc --help"] = help_texts()
    return texts


def is_output(reference: str) -> bool:
    """An output file of a command (not a document), e.g. ``OUT/report.md``."""
    return Path(reference).name in OUTPUT_NAMES and not reference.startswith(("docs/", "results/"))


def resolve(reference: str) -> Path | None:
    """The file a reader finds for ``reference``, or None."""
    reference = reference.lstrip("./")
    candidates = [ROOT / reference] if reference.startswith("docs/") else [DOCS / reference]
    candidates.append(ROOT / reference)
    return next((path for path in candidates if path.is_file()), None)


def missing_documents(texts: dict[str, str]) -> list[str]:
    """``"where: reference"`` for every named document that does not exist."""
    return [
        f"{where}: {reference}"
        for where, text in texts.items()
        for reference in sorted(set(REFERENCE.findall(text)))
        if not is_output(reference) and resolve(reference) is None
    ]


def test_the_checker_catches_a_missing_document():
    text = "see docs/nowhere.md, method.md section 2, results/ufm-10/report.md and OUT/report.md"
    assert missing_documents({"made-up": text}) == ["made-up: docs/nowhere.md"]
    assert missing_documents({"made-up": "see gone.md and results/none/report.md"}) == [
        "made-up: gone.md",
        "made-up: results/none/report.md",
    ]


def test_every_named_document_exists():
    texts = sources()
    assert len(texts) > 40 and "docs/method.md" in texts  # the scan saw the package and the docs
    assert missing_documents(texts) == []


@pytest.mark.parametrize("name", sorted(OUTPUT_NAMES))
def test_the_output_names_are_written_by_the_package(name):
    package = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    assert re.search(rf"[\"']{re.escape(name)}[\"']", package), name


def test_the_sdist_carries_the_docs_and_the_tests():
    # MANIFEST.in decides what goes into the sdist (the build itself runs in .ci/run).
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert {"graft docs", "graft tests"} <= {line.strip() for line in manifest}
