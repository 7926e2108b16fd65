"""The repository stands alone: what it cites about the paper is in docs/study.md, and every
section it cites there exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study.md"
SECTION_REFERENCE = re.compile(r"docs/study\.md,? section (\d+)")
OUTSIDE = re.compile(r"STUDY\.md|\.\./shared")


def tracked_texts() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in names:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            texts[name] = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
    return texts


def study_sections(text: str) -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE))


def outside_references(texts: dict[str, str]) -> list[str]:
    return [f"{name}:{number}" for name, text in texts.items()
            for number, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]


def test_nothing_refers_to_files_outside_the_repository():
    texts = tracked_texts()
    assert outside_references(texts) == []
    # the check sees a reference where there is one
    outside = "see ../" + "shared/" + "STUDY" + ".md"  # spelled apart: no reference here
    assert outside_references({"x.py": outside}) == ["x.py:1"]


def test_every_cited_section_of_the_study_exists():
    sections = study_sections(STUDY.read_text())
    assert {"2", "3", "4", "5", "6", "7"} <= sections
    cited = {(name, number) for name, text in tracked_texts().items()
             for number in SECTION_REFERENCE.findall(text)}
    assert cited, "the code cites the study's sections"
    assert [c for c in cited if c[1] not in sections] == []
