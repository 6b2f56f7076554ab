"""The README and docs/ stay true: their Python examples run, and their `dlconv explain`
transcripts are what the command prints today."""

import pathlib
import re
import shlex

import pytest

from dlconv import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PY_BLOCKS, EXPLAIN = [], []
for _doc in DOCS:
    _text = _doc.read_text(encoding="utf-8")
    _name = _doc.relative_to(ROOT).as_posix()
    PY_BLOCKS += [(f"{_name} python block {i + 1}", b)
                  for i, b in enumerate(re.findall(r"```python\n(.*?)```", _text, flags=re.S))]
    EXPLAIN += re.findall(r"```text\n\$ (dlconv explain [^\n]*)\n(.*?)```", _text, flags=re.S)
README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")


def test_docs_have_examples():
    assert len(PY_BLOCKS) >= 4 and len(EXPLAIN) >= 4
    assert "```python" in README_TEXT and "$ dlconv explain" in README_TEXT


def test_readme_links_resolve():
    for link in re.findall(r"\]\(([^)#]+)\)", README_TEXT):
        if "://" not in link:
            assert (ROOT / link).exists(), link


@pytest.mark.parametrize("name,block", PY_BLOCKS, ids=[n for n, _ in PY_BLOCKS])
def test_python_example_runs(name, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, name, "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("cmd,shown", EXPLAIN, ids=[c for c, _ in EXPLAIN])
def test_explain_transcript_is_current(cmd, shown, capsys):
    assert cli.main(shlex.split(cmd)[1:]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    # The README may shorten a transcript with a "  ..." line; every shown line must be
    # printed, in order.
    it = iter(printed)
    for line in shown.rstrip().splitlines():
        if line.strip() == "...":
            continue
        assert any(p == line for p in it), f"README line not in `{cmd}` output: {line!r}"


def test_the_documented_example_kernel_is_the_file():
    doc = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    src = (ROOT / "examples" / "my_conv2d.py").read_text(encoding="utf-8")
    code = src[src.index("import numpy as np"):]
    assert f"```python\n{code}```" in doc
