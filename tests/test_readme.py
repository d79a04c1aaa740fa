"""The documentation runs as written: the README and the pages under docs/ (DOC_PAGES).

Their Python API block runs verbatim (in a temporary working directory), every `hvae-fast` command
in their bash blocks parses and builds a valid config, and every relative link resolves inside the
repository.
"""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every documentation page whose commands, Python block and links these tests check; a page added
# under docs/ must be listed here (test_every_docs_page_is_checked).
DOC_PAGES = [
    REPO / "README.md",
    *(REPO / "docs" / name for name in (
        "usage.md", "reliability.md", "kernels.md", "experiments.md", "results.md", "choices.md",
        "method.md",
    )),
]


def test_every_docs_page_is_checked():
    assert sorted((REPO / "docs").glob("*.md")) == sorted(DOC_PAGES[1:])


def _python_api_section():
    """(page, text after its `## Python API` heading); exactly one page holds that section."""
    found = [(page, page.read_text().split("\n## Python API\n", 1)) for page in DOC_PAGES]
    found = [(page, parts[1]) for page, parts in found if len(parts) == 2]
    assert len(found) == 1, [str(page) for page, _ in found]
    return found[0]


def test_python_api_block_runs(tmp_path, shared_data, monkeypatch, capsys):
    page, section = _python_api_section()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HVAE_DATA_DIR", str(shared_data))
    exec(compile(code, f"{page.relative_to(REPO)} (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"step \d+: ELBO -\d+\.\d, IW bound -\d+\.\d, active units \[", out), out
    assert (tmp_path / "runs/api-demo/samples.png").stat().st_size > 0
    assert os.path.exists(tmp_path / "runs/api-demo/checkpoint-best.pt")


def _doc_commands():
    """Every `hvae-fast ...` command in DOC_PAGES' bash blocks, continuation lines joined, $m expanded."""
    import shlex

    cmds = []
    blocks = [b for page in DOC_PAGES for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    for block in blocks:
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


def test_doc_commands_parse_and_their_train_configs_validate(tmp_path, monkeypatch):
    """Each documented command is accepted by the parser; each `train` builds a valid config (no training)."""
    from hvae_fast import cli

    cmds = _doc_commands()
    # the main job, the quick start's three commands, and the reproduce block's sweeps
    for expected in (["train", "cifar10"], ["train", "binarized-mnist", "--steps", "1000", "--out", "runs/quick"]):
        assert expected in cmds, expected
    assert {"eval", "sample", "sweep", "report", "memory"} <= {c[0] for c in cmds}
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


def _github_anchor(heading):
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(text):
    """Targets of the Markdown links and images in `text`, outside fenced code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose)


def _anchors(page):
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(page):
    """Each relative link or image in a page names a file of this repository (and a heading there)."""
    bad = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: are not files
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO) or not file.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not bad, bad


def _expand_braces(path):
    """`a.{x,y}` -> [`a.x`, `a.y`] (one brace group, as the docs write them)."""
    m = re.search(r"\{([^}]*)\}", path)
    return [path[: m.start()] + alt + path[m.end():] for alt in m.group(1).split(",")] if m else [path]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_the_docs_exist(page):
    """Each `tests/...`, `hvae_fast/...`, `docs/...` (etc.) path a page names in prose exists, and so
    does each `file.py::test_name` it cites for a guarantee; `<...>` names outputs, not files."""
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    bad = []
    for tok in re.findall(r"`([^`\s]+)`", prose):
        m = re.match(r"((?:hvae_fast|tests|docs|bench|csrc|kernels|\.ci)/[^:]*)(?:::(\w+))?$", tok)
        if not m or "<" in tok:
            continue
        for path in _expand_braces(m.group(1)):
            files = list(REPO.glob(path)) if "*" in path else [REPO / path]
            if not files or not all(f.exists() for f in files):
                bad.append(f"{tok}: no such path")
            elif m.group(2) and f"def {m.group(2)}(" not in files[0].read_text():
                bad.append(f"{tok}: no test {m.group(2)} in {path}")
    assert not bad, bad
