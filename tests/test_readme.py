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
        for line in block.replace("\\\n", " ").splitlines():
            # quote-aware: ';' inside a quoted --list value does not end a command
            lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lex.whitespace_split, lex.commenters = True, "#"
            part = []
            for tok in [*lex, ";"]:
                if tok in (";", "&&", "||", "|"):
                    if part[:1] == ["hvae-fast"]:
                        for m in (["vae", "hvae"] if "$m" in part else [None]):
                            cmds.append([t.replace("$m", m) if m else t for t in part[1:]])
                    part = []
                else:
                    part.append(tok)
    return cmds


def test_readme_commands_parse_and_their_train_configs_validate(tmp_path, monkeypatch):
    """Each README command is accepted by the parser; each `train` builds a valid config (no training)."""
    from hvae_fast import cli

    cmds = _readme_commands()
    assert any(c[0] == "train" for c in cmds) and any(c[0] == "sweep" for c in cmds)
    monkeypatch.chdir(tmp_path)  # output paths (--json memory.json, ...) are checked in a scratch folder
    for argv in cmds:
        args = cli.build_parser().parse_args(argv)
        if argv[0] == "train":
            cli.config_from_args(args)
        elif argv[0] == "sweep":  # every point's train command builds a valid config
            from hvae_fast.experiments import sweep

            for point in sweep.expand(args.axes or []):
                flags = [x for k, v in point.items() for x in (sweep.flag(k), v)]
                if args.find_critical_rho:
                    flags += ["--rho", str((args.rho_low + args.rho_high) / 2)]
                cli.config_from_args(cli.build_parser().parse_args(args.command + flags))
