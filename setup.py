"""Packaging beyond pyproject.toml: ship csrc/ inside the wheel as hvae_fast/csrc.

The C++/CUDA OU kernels are compiled with ninja through torch.utils.cpp_extension on first use
(into a per-user cache; `hvae-fast build` does it ahead of time), so installing needs no compiler.
An editable install (`pip install -e .`) reads the sources from the checkout's csrc/.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "hvae_fast" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in Path(__file__).parent.joinpath("csrc").iterdir():
            if src.suffix in (".cpp", ".cu", ".h", ".cuh"):
                shutil.copy2(src, dest / src.name)


setup(cmdclass={"build_py": BuildPyWithSources})
