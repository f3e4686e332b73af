"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = block.replace('"runs/api"', repr(str(tmp_path / "api")))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("test accuracy") == 4
    assert list((tmp_path / "api").glob("lottery-*/results.csv"))
