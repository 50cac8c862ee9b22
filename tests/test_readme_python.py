"""The README's "Using npqfile from Python" snippets run as written (pandas stubbed when absent)."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Using npqfile from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    snippets = _snippets()
    assert len(snippets) == 4
    monkeypatch.chdir(tmp_path)
    if importlib.util.find_spec("pandas") is None:
        # pandas is not a dependency: a stand-in that checks what the snippet hands it
        class Frame(list):
            def __getitem__(self, cols):
                if isinstance(cols, list):
                    assert all(any(c in row for row in self) for c in cols), cols   # pandas' columns
                    return self
                return super().__getitem__(cols)

        def json_normalize(rows):
            flat = []
            for row in rows:
                out = {}
                for k, v in row.items():
                    if isinstance(v, dict):
                        out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
                    else:
                        out[k] = v
                flat.append(out)
            return Frame(flat)

        monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(json_normalize=json_normalize))
    namespace: dict = {}
    for code in snippets:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["st"].status == "completed"
    assert [r["status"] for r in namespace["rows"]] == ["completed"] * 4
    assert (tmp_path / "snap.bin").exists() and (tmp_path / "run.jsonl").exists()
    assert "completed" in capsys.readouterr().out
