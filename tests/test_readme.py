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


def _readme_commands():
    """Every `hvae-fast ...` command in the README's bash blocks, continuation lines joined, $m expanded."""
    import shlex

    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        text = block.replace("\\\n", " ")
        for part in re.split(r"&&|\n|;", text):
            part = part.split("#", 1)[0].strip()
            if part.startswith("hvae-fast "):
                for m in (["vae", "hvae"] if "$m" in part else [None]):
                    cmds.append(shlex.split(part.replace("$m", m) if m else part)[1:])
    return cmds


def test_readme_commands_parse_and_their_train_configs_validate(tmp_path, monkeypatch):
    """Each README command is accepted by the parser; each `train` builds a valid config (no training)."""
    from hvae_fast import cli

    cmds = _readme_commands()
    assert any(c[0] == "train" for c in cmds) and any(c[0] == "eval" for c in cmds)
    monkeypatch.chdir(tmp_path)  # output paths (--json memory.json, ...) are checked in a scratch folder
    for argv in cmds:
        args = cli.build_parser().parse_args(argv)
        if argv[0] == "train":
            cli.config_from_args(args)
