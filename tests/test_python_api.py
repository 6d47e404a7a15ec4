"""docs/python-api.md runs as written: its code blocks, in order, in one namespace."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def test_the_python_api_page_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "refused: train.lr_schedule: must be one of" in out
    assert namespace["report"]["rounds"][-1]["status"] == "ok"
    assert namespace["mine"]["metrics"]["lead"] == "loss"  # the tickets' answers are sentences
    assert "PeftModel" in out
