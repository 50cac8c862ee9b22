"""The README's promises: its quick example runs, its first two lines are the two
set-up commands, and .ci/run calls the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quick_example_runs(tmp_path, capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = code.replace("/tmp/pages.bin", str(tmp_path / "pages.bin"))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "0"


def test_two_commands_and_ci_calls_the_test_command():
    block = re.search(r"```sh\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and block[0].endswith("npqfile migrate") and "pytest" in block[1]
    assert block[1] in (ROOT / ".ci" / "run").read_text()
