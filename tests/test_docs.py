"""The documents cite only what the repository holds, and their numbers come from its data.

- Every relative link and image of README.md, CHANGELOG.md, docs/*.md, benchmarks/README.md and
  csrc/README.md points at a file that exists, and every #anchor at a heading of its page.
- Every backticked repository path in them exists (relative to the document or to the root).
- Every ``docs/<page>.md#<anchor>`` that the code cites exists.
- The results tables are what ``benchmarks/tables.py`` makes of the committed result files, and
  docs/design.md's bytes per window are what the benchmark's accounting computes.
- README.md stays a short user README (about 200 lines) and keeps the two commands of a fresh
  machine, the test command being the one ``.ci/run`` runs.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
                    ROOT / "csrc" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 210   # "about 200": the user README, with the generated summary table

BENCH_COMMAND = "pip install torch==2.13.0 ninja -e . && python -m fused_accum bench"
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest tests -q'


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _prose(text: str) -> str:
    """The text without its fenced code blocks (links and paths there are code, not citations)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)   # inline code: not a link
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def _resolve(doc: Path, target: str) -> Path:
    return (doc.parent / target).resolve() if target else doc


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_every_relative_link_and_anchor_exists(doc):
    broken = []
    for link in links(doc):
        if re.match(r"[a-z]+:", link):   # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = _resolve(doc, target)
        if not path.exists():
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            broken.append(f"{link}: no {where}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)} links to what is not there:\n" + "\n".join(broken)


SOURCE_SUFFIXES = (".py", ".md", ".sh", ".cpp", ".cu", ".h")
PATH_SUFFIXES = SOURCE_SUFFIXES + (".json", ".png", ".txt", ".cfg", ".toml")


def repo_paths(doc: Path) -> list[str]:
    """The backticked spans of a document that name files or folders of the repository: those
    with a slash or a file suffix, no spaces, not absolute, home- or variable-based.  A bare name
    (no slash) counts when it is source (``.py``, ``.md``, ...): output files of the tools
    (``session.log``, ``demo.json``) are named bare."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", _prose(doc.read_text(encoding="utf-8"))):
        if re.search(r"\s|://|[=()\[\],]", span) or span[0] in "/~$-":
            continue
        if "/" in span:
            out.append(span)
        elif span.endswith(SOURCE_SUFFIXES):
            out.append(span)
    return out


def _tracked() -> list[str]:
    try:
        return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".git" not in p.parts]


def _exists(doc: Path, span: str, names: set[str]) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", span)   # placeholders: <run>.json
    for base in (doc.parent, ROOT):
        if any(c in pattern for c in "*?"):
            if list(base.glob(pattern)):
                return True
        elif (base / pattern).exists():
            return True
    # a bare source name or pattern (`*.cu`): somewhere in the repository
    return "/" not in span and any(fnmatch.fnmatch(name, pattern) for name in names)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_every_backticked_path_exists(doc):
    names = {Path(p).name for p in _tracked()}
    missing = [span for span in repo_paths(doc) if not _exists(doc, span, names)]
    assert not missing, (f"{doc.relative_to(ROOT)} cites paths the repository does not hold: "
                         f"{missing}")


def test_no_document_cites_the_design_file_outside_the_repository():
    citing = [str(d.relative_to(ROOT)) for d in DOCUMENTS
              if "DESIGN.md" in d.read_text(encoding="utf-8")]
    assert not citing, f"cite docs/design.md instead of DESIGN.md in {citing}"


def test_the_docs_pages_the_code_cites_exist():
    broken = []
    for name in _tracked():
        if not name.endswith((".py", ".cpp", ".cu", ".h", ".sh")):
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for page, anchor in re.findall(r"\bdocs/([\w\-]+\.md)(?:#([\w\-]+))?", text):
            path = ROOT / "docs" / page
            if not path.exists():
                broken.append(f"{name}: docs/{page}")
            elif anchor and anchor not in anchors(path):
                broken.append(f"{name}: docs/{page}#{anchor}")
    assert not broken, "the code cites docs that are not there:\n" + "\n".join(broken)


def _tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables",
                                                  ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLES = _tables()


@pytest.mark.parametrize("name", list(TABLES.TABLES))
def test_committed_tables_are_what_the_results_give(name):
    where = TABLES.TABLES[name][0]
    committed = TABLES.committed(name)
    assert committed is not None, f"{where} lost the markers of table {name!r}"
    assert committed == TABLES.generate(name), (
        f"table {name!r} in {where} differs from what the committed results give: run "
        "python benchmarks/tables.py --write")


def test_design_bytes_per_window_are_the_benchmarks_accounting():
    import torch
    from fused_accum.bench.windows import bytes_per_parameter

    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- bytes:windows -->\n(.*?)<!-- /bytes:windows -->", text, re.DOTALL)
    assert block, "docs/design.md lost its bytes:windows table"
    rows = [r for r in block.group(1).splitlines()[2:] if r.startswith("|")]
    assert rows
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        what = cells[0]
        config = SimpleNamespace(
            dtype=dtypes[what.split(",")[0]], k=int(re.search(r"k = (\d+)", what).group(1)),
            optimizer="sgd" if "SGD" in what else "adamw",
            max_grad_norm=1.0 if "clipping" in what else None,
            loss_scaling="loss scaling" in what)
        for pipeline, cell in zip(["fused_accum", "fused_accum compact", "torch best",
                                   "torch naive"], cells[1:]):
            if cell:
                assert int(cell) == bytes_per_parameter(config, pipeline), (what, pipeline)


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    blocks = re.findall(r"^```bash\n(.*?)\n```", text, re.DOTALL | re.MULTILINE)
    assert blocks[:2] == [BENCH_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_run = TEST_COMMAND.split("&& ", 1)[1]          # python -m pytest tests -q
    assert f"python3 {test_run.removeprefix('python ')}" in ci
    assert "## How long things take" in text
