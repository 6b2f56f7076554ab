"""The README stays true: its Python examples run, and its `dlconv explain` transcripts are
what the command prints today."""

import pathlib
import re
import shlex

import pytest

from dlconv import cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
PY_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
EXPLAIN = re.findall(r"```text\n\$ (dlconv explain [^\n]*)\n(.*?)```", TEXT, flags=re.S)


def test_readme_has_examples():
    assert len(PY_BLOCKS) >= 2 and len(EXPLAIN) >= 3


@pytest.mark.parametrize("i", range(len(PY_BLOCKS)))
def test_python_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(PY_BLOCKS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


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
