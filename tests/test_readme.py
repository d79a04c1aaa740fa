"""The README's Python API block runs as written (in a temporary working directory)."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_block_runs(tmp_path, shared_data, monkeypatch, capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HVAE_DATA_DIR", str(shared_data))
    exec(compile(code, "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"step \d+: ELBO -\d+\.\d, IW bound -\d+\.\d, active units \[", out), out
    assert (tmp_path / "runs/api-demo/samples.png").stat().st_size > 0
    assert os.path.exists(tmp_path / "runs/api-demo/checkpoint-best.pt")
