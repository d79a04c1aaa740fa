"""hvae_fast.fsutil.atomic_write, the one way the project replaces a file: unique temporary names,
fsync, a rename that never writes through a planted link, nothing left by a failed write; and the
writers outside the run folder (data cache, download, auto-backend cache, gpucheck reports) use it."""

import ast
import json
import os
from pathlib import Path

import pytest

from hvae_fast import fsutil

REPO = Path(__file__).resolve().parent.parent


def test_atomic_write_replaces_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    target = tmp_path / "f.json"
    target.write_text("old")
    fsutil.atomic_write_text("new", target)
    assert target.read_text() == "new" and len(synced) == 2  # the file, then its folder
    assert os.listdir(tmp_path) == ["f.json"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~fsutil._umask()


def test_atomic_write_temp_names_are_unique_and_never_a_planted_link(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_text("mine")
    seen = []

    def write(f):
        seen.append(sorted(p for p in os.listdir(tmp_path / "d") if p.startswith(".f.tmp-")))
        f.write(b"x")

    (tmp_path / "d").mkdir()
    target = tmp_path / "d" / "f"
    for _ in range(2):
        fsutil.atomic_write(target, write)
    assert seen[0] != seen[1] and all(len(s) == 1 for s in seen)
    # a planted link at the target is replaced by the new file, its target untouched
    target.unlink()
    target.symlink_to(outside)
    fsutil.atomic_write_text("new", target)
    assert not target.is_symlink() and target.read_text() == "new" and outside.read_text() == "mine"


@pytest.mark.parametrize("stage", ["write", "check"])
def test_a_failed_or_refused_write_leaves_the_old_file_and_no_temp(tmp_path, stage):
    target = tmp_path / "f"
    target.write_text("old")

    def write(f):
        f.write(b"partial")
        if stage == "write":
            raise OSError(28, "No space left on device")

    def check(tmp):
        assert tmp.read_bytes() == b"partial"  # the content is checked before it takes the name
        raise ValueError("bad content")

    with pytest.raises(OSError if stage == "write" else ValueError):
        fsutil.atomic_write(target, write, check=check)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_the_writers_outside_the_run_folder_use_the_one_helper():
    """No module but fsutil creates temporary files or renames them into place."""
    offenders = []
    for path in sorted((REPO / "hvae_fast").rglob("*.py")):
        if path.name == "fsutil.py" or "kernels" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "mkstemp", "NamedTemporaryFile") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("os", "tempfile"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
    assert offenders == []


def test_the_auto_backend_cache_write_does_not_follow_a_planted_temp_link(tmp_path):
    """Its temporary name was AUTO.<pid>.tmp, written through whatever was there."""
    from hvae_fast.ops.autotune import DecisionCache

    outside = tmp_path / "outside"
    outside.write_text("mine")
    path = tmp_path / "auto-backend.json"
    (tmp_path / f"auto-backend.json.{os.getpid()}.tmp").symlink_to(outside)
    DecisionCache(path, "env").put("k", {"choice": "torch", "ms": {"torch": 1.0}})
    assert outside.read_text() == "mine"
    assert json.loads(path.read_text())["environments"]["env"]["k"]["choice"] == "torch"


def test_the_gpucheck_reports_do_not_follow_a_planted_temp_link(tmp_path, monkeypatch):
    """Their temporary names were report.json.tmp / report.md.tmp, written through whatever was there."""
    from hvae_fast import gpucheck

    monkeypatch.setattr(gpucheck, "goals", lambda out, cpu: [])
    monkeypatch.setattr(gpucheck, "markdown", lambda rep, out: "# report\n")
    outside = tmp_path / "outside"
    outside.write_text("mine")
    for name in ("report.json.tmp", "report.md.tmp"):
        (tmp_path / name).symlink_to(outside)
    gpucheck.write_reports(tmp_path, [], {"mode": "cpu"})
    assert outside.read_text() == "mine" and (tmp_path / "report.md").read_text() == "# report\n"
    assert json.loads((tmp_path / "report.json").read_text())["mode"] == "cpu"
