"""Packaging (issue 18.15, 18.16): one version, an SPDX license with its file, a bounded build
requirement, and a wheel that builds with it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hvae_fast

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_version_is_written_once_and_printed_by_the_cli():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hvae_fast.__version__"}
    p = subprocess.run([sys.executable, "-m", "hvae_fast", "--version"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"hvae-fast {hvae_fast.__version__}"


def test_license_is_an_spdx_expression_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "hvae-fast contributors" in text
    assert project["authors"]


def _setuptools_bound():
    from packaging.requirements import Requirement

    (req,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    return req.specifier


def test_build_requirement_is_bounded_and_reads_spdx_licenses():
    spec = _setuptools_bound()
    # 77.0.3 is the first setuptools that builds `license = "MIT"`; an open upper end would take
    # untested majors.
    assert "77.0.2" not in spec and "77.0.3" in spec
    assert any(s.operator == "<" for s in spec)


def test_wheel_builds_with_the_license_and_version(tmp_path):
    import setuptools

    if setuptools.__version__ not in _setuptools_bound():
        pytest.skip(f"installed setuptools {setuptools.__version__} is outside the build requirement")
    # A copy of what the wheel is built from, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "kernels")  # hvae_fast/kernels: a dev-only link
    for name in ("hvae_fast", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=junk if name == "hvae_fast" else None)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("hvae_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"hvae_fast-{hvae_fast.__version__}.dist-info/METADATA").decode()
        names = z.namelist()
    assert f"Version: {hvae_fast.__version__}\n" in meta and "License-Expression: MIT\n" in meta
    assert f"hvae_fast-{hvae_fast.__version__}.dist-info/licenses/LICENSE" in names
