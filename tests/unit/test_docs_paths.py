"""Every repository path that README.md and spec/**/*.md cite exists.

What counts as a cited path (:func:`cited_paths`; nothing else is checked):

1. a relative Markdown link target, ``[text](target)``: resolved from the citing file's folder, a
   ``#anchor`` dropped; URLs (``scheme:``) and bare ``#anchors`` are not paths;
2. a backticked token, or a word of a fenced code block, made only of path characters
   (letters, digits, ``_ . / * -``) that starts with a top-level folder of the repository
   (:data:`TOP_DIRS`) or is a root file (:data:`ROOT_FILES`): resolved from the repository root; a
   ``*`` is a glob that must match something; a trailing ``:LINE`` is dropped and a trailing
   ``::name`` must be a function or class defined in that file;
3. a backticked bare test file name, ``test_x.py`` or ``test_x.py::test_name``: exactly one file of
   that name under ``tests/``, with ``test_name`` defined in it.

Tokens with spaces or other characters (commands, code, ``{a,b}`` patterns) are not paths, and paths
outside the repository (a peer's ``gpt_oss/torch/model.py``) do not start with a top-level folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_DIRS = ("gptevo/", "spec/", "tests/", "tools/", ".ci/")
ROOT_FILES = ("README.md", "pyproject.toml")
_PATH_CHARS = re.compile(r"[A-Za-z0-9_./*-]+(?::\d+|::\w+)?")
_BARE_TEST = re.compile(r"test_\w+\.py(?:::\w+)?")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_BACKTICKED = re.compile(r"`([^`\n]+)`")


@dataclass(frozen=True)
class Citation:
    line: int        # 1-based line of the citing document
    token: str       # as written (after stripping trailing punctuation in code blocks)
    kind: str        # "link" (relative to the document) | "repo" (relative to the root) | "test" (under tests/)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _is_repo_token(token: str) -> bool:
    return bool(_PATH_CHARS.fullmatch(token)) and (token.startswith(TOP_DIRS) or token in ROOT_FILES)


def cited_paths(text: str) -> list[Citation]:
    """The citations of one Markdown document, by the rules of the module doc."""
    out: list[Citation] = []
    fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]

    def in_fence(pos: int) -> bool:
        return any(a <= pos < b for a, b in fenced)

    for a, b in fenced:                                   # rule 2 for the words of code blocks
        for m in re.finditer(r"\S+", text[a:b]):
            word = m.group(0).rstrip(",;:)").lstrip("(")
            if _is_repo_token(word):
                out.append(Citation(_line_of(text, a + m.start()), word, "repo"))
    for m in _LINK.finditer(text):
        target = m.group(1)
        if in_fence(m.start()) or target.startswith("#") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
            continue
        out.append(Citation(_line_of(text, m.start()), target.split("#", 1)[0], "link"))
    for m in _BACKTICKED.finditer(text):
        if in_fence(m.start()):
            continue
        token = m.group(1).strip()
        if _is_repo_token(token):
            out.append(Citation(_line_of(text, m.start()), token, "repo"))
        elif _BARE_TEST.fullmatch(token):
            out.append(Citation(_line_of(text, m.start()), token, "test"))
    return sorted(out, key=lambda c: (c.line, c.token))


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", path.read_text(), re.M) is not None


def problems(citations: list[Citation], doc: Path, root: Path) -> list[str]:
    """One message per citation of ``doc`` that does not resolve inside ``root``."""
    out = []
    for c in citations:
        where = f"{doc.relative_to(root)}:{c.line}: `{c.token}`"
        path_part, _, name = c.token.partition("::")
        path_part = re.sub(r":\d+$", "", path_part)
        if c.kind == "test":
            found = sorted((root / "tests").rglob(path_part))
            if len(found) != 1:
                out.append(f"{where}: {len(found)} files named {path_part} under tests/ (expected one)")
                continue
            target = found[0]
        else:
            base = doc.parent if c.kind == "link" else root
            if "*" in path_part:
                if not any(base.glob(path_part)):
                    out.append(f"{where}: the pattern matches nothing")
                continue
            target = (base / path_part).resolve()
            if root.resolve() not in (target, *target.parents):
                out.append(f"{where}: resolves outside the repository")
                continue
            if not target.exists():
                out.append(f"{where}: no such file or folder")
                continue
        if name and not (target.is_file() and _defines(target, name)):
            out.append(f"{where}: {target.name} defines no {name!r}")
    return out


DOCS = [REPO / "README.md", *sorted((REPO / "spec").rglob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_path_exists(doc):
    found = problems(cited_paths(doc.read_text(encoding="utf-8")), doc, REPO)
    assert not found, "paths cited but missing:\n" + "\n".join(found)


def test_the_documents_cite_paths_at_all():
    """The extractor finds the citations known to be there (an extractor that finds nothing passes
    the test above vacuously)."""
    readme = {c.token for c in cited_paths((REPO / "README.md").read_text(encoding="utf-8"))}
    assert {".ci/run", "spec/README.md"} <= readme
    spec_readme = {c.token for c in cited_paths((REPO / "spec" / "README.md").read_text(encoding="utf-8"))}
    assert {"errata.md", "ops/attention.md", "gptevo/conformance/compare.py"} <= spec_readme


FAKE = """# A fake document
See [the ops](ops/real.md), [a gone page](ops/gone.md#intro), [the web](https://example.org/x.md)
and [a section](#usage). The code is in `gptevo/real.py` and `gptevo/gone.py`; kernels in
`gptevo/kernels/*.cu`, none in `gptevo/kernels/*.cuh`. Peer code `gpt_oss/torch/model.py` is not ours,
`gptevo generate "x"` is a command, `tests/unit/test_real.py::test_there` exists,
`tests/unit/test_real.py::test_missing` does not, nor `test_real.py::test_gone`; `test_real.py`
and `test_absent.py` are bare names. `../outside.md` and `spec/../../outside.md` leave the tree.

```bash
python tools/real_tool.py --out x && python tools/gone_tool.py
```
"""


def test_extractor_on_a_fake_tree_reports_exactly_the_missing_paths(tmp_path):
    for rel, body in {"gptevo/real.py": "", "gptevo/kernels/a.cu": "", "spec/ops/real.md": "",
                      "tests/unit/test_real.py": "def test_there():\n    pass\n", "tools/real_tool.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    doc = tmp_path / "spec" / "fake.md"
    doc.write_text(FAKE)
    cites = cited_paths(FAKE)
    tokens = {c.token for c in cites}
    assert "https://example.org/x.md" not in tokens and "#usage" not in tokens
    assert not any("gpt_oss" in t or "generate" in t for t in tokens)
    assert {"tools/real_tool.py", "tools/gone_tool.py"} <= tokens        # code-block words count
    found = problems(cites, doc, tmp_path)
    missing = sorted(msg.split("`")[1] for msg in found)
    assert missing == sorted(["ops/gone.md", "gptevo/gone.py", "gptevo/kernels/*.cuh",
                              "tests/unit/test_real.py::test_missing", "test_real.py::test_gone",
                              "test_absent.py", "tools/gone_tool.py", "spec/../../outside.md"]), found
    assert all(msg.startswith("spec/fake.md:") for msg in found)
    line_of_gone = next(c.line for c in cites if c.token == "gptevo/gone.py")
    assert line_of_gone == 3
