"""The design lives in the repository: ``docs/architecture.md`` and ``docs/model.md``.

Checked on the source tree, each test listing every offender at once:

* nothing cites a design document that is not in the repository (the design notes the
  project started from, their section numbers, the style notes);
* every ``docs/*.md`` a file cites exists, and every section it names in quotes right after
  the path (``docs/model.md`` "DeepNorm") is a ``##`` heading of that file;
* the two design pages keep the section headings other files cite;
* every public class of ``model/``, ``kernels/`` and ``services/`` has a docstring.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()             # quotes the patterns it looks for
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".cache", "build", "dist", "node_modules"}
SKIP_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pt", ".model", ".so", ".pyc", ".gz", ".tar"}

# Citations of documents outside the repository. Built from pieces so that this file does
# not cite them itself.
SECTION = "\u00a7"
FOREIGN = [
    re.compile("DESIGN" + r"\s*" + SECTION),                    # DESIGN §7
    re.compile(r"\breference\s*" + SECTION, re.IGNORECASE),     # reference §1.2
    re.compile("DESIGN" + r"\.md"),
    re.compile(r"reference/glm130b" + r"\.md"),
    re.compile(r"\bplatform" + r"\.md"),
    re.compile(r"\bserving" + r"\.md"),
    re.compile(r"\bSTYLE" + r"(\.md|\s+habit)"),
]

REQUIRED_SECTIONS = {
    "architecture.md": ["Processes", "Shard protocol", "Redis contract", "Scheduler", "Layering",
                        "Configuration"],
    "model.md": ["DeepNorm", "Attention and QKV layout", "GeGLU", "Positions", "Masks", "Quantization",
                 "Generation"],
}

# docs/NAME.md, then (optionally, across a line break and a comment marker) the quoted
# section names that follow it: docs/model.md "Positions", "Generation".
DOC_PATH = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)`{0,2}"
                      r'((?:[ \t]*(?:\n[ \t]*(?:#[ \t]*)?)?(?:,|and)?[ \t]*"[^"\n]{1,60}")*)')
QUOTED = re.compile(r'"([^"\n]{1,60})"')


def repository_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() not in SKIP_SUFFIXES and path != SELF:
            files.append(path)
    return files


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def headings(doc: Path) -> set[str]:
    return {line[3:].strip() for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}


def test_no_citation_of_documents_outside_the_repository():
    offenders = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in FOREIGN):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, ("cite docs/architecture.md or docs/model.md (or the official source "
                           "files) instead:\n" + "\n".join(offenders))


def test_cited_docs_and_their_sections_exist():
    docs = ROOT / "docs"
    missing = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for match in DOC_PATH.finditer(text):
            name, quoted = match.group(1), match.group(2)
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            doc = docs / name
            if not doc.is_file():
                missing.append(f"{where}: docs/{name} does not exist")
                continue
            known = headings(doc)
            missing += [f'{where}: docs/{name} has no section "{section}"'
                        for section in QUOTED.findall(quoted) if section not in known]
    assert not missing, "\n".join(missing)


def test_design_pages_keep_the_cited_sections():
    missing = [f'docs/{name}: no "## {section}"' for name, sections in REQUIRED_SECTIONS.items()
               for section in sections if section not in headings(ROOT / "docs" / name)]
    assert not missing, "\n".join(missing)


def undocumented_classes(*packages: str) -> list[str]:
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if "proto_gen" in rel.parts or any(part in SKIP_DIRS for part in rel.parts):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [f"{rel}:{node.lineno}: class {node.name}" for node in ast.walk(tree)
                      if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
                      and ast.get_docstring(node) is None]
    return found


def test_every_public_class_has_a_docstring():
    missing = undocumented_classes("model", "kernels", "services")
    assert not missing, "public classes without a docstring:\n" + "\n".join(missing)


def test_the_checks_see_what_they_look_for():
    """The patterns catch the citations they are meant to catch (and only those)."""
    bad = ["(" + "DESIGN" + " " + SECTION + "9)", "(reference " + SECTION + "1.2)", "Reference " + SECTION + "4.2",
           "`reference/" + "platform.md` " + SECTION + "3", "reference/" + "serving.md",
           "STYLE" + " habit 2", "/work/shared/" + "DESIGN.md"]
    good = ["docs/architecture.md \"Scheduler\"", "tests/glm_reference.py", "docs/deploy.md " + SECTION + "8",
            "the reference implementation"]
    assert all(any(p.search(s) for p in FOREIGN) for s in bad)
    assert not any(p.search(s) for p in FOREIGN for s in good)
    sample = 'see ``docs/model.md``\n    "Checkpoint layout", "GeGLU"), and docs/architecture.md "Masks"'
    cited = [(m.group(1), QUOTED.findall(m.group(2))) for m in DOC_PATH.finditer(sample)]
    assert cited == [("model.md", ["Checkpoint layout", "GeGLU"]), ("architecture.md", ["Masks"])]
