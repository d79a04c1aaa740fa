"""Shared test settings: where the offline datasets are, and a parse cache per test session."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# CI and the README point HVAE_DATA_DIR at ../shared/data; fall back to that path beside the repo.
# Made absolute once, here, and put back in the environment: tests that change directory, make
# symlinks to it or start subprocesses elsewhere must all find the same folder.
SHARED_DATA = Path(os.environ.get("HVAE_DATA_DIR") or REPO.parent / "shared" / "data").expanduser().absolute()
if os.environ.get("HVAE_DATA_DIR"):
    os.environ["HVAE_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def _session_parse_cache(tmp_path_factory):
    """Parsed-dataset cache in a session temp dir, unless the caller chose one (HVAE_CACHE_DIR)."""
    if "HVAE_CACHE_DIR" not in os.environ:
        os.environ["HVAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("parsed"))
    yield


@pytest.fixture
def shared_data():
    """The offline dataset copies; skips with the reason when they are absent."""
    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}: set HVAE_DATA_DIR")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op thread is several times faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline(monkeypatch):
    """Every dataset download points at a closed loopback port: the machine is offline for this test."""
    from dataclasses import replace

    from hvae_fast import data as data_mod

    for name, spec in data_mod.SPECS.items():
        files = {s: tuple(replace(src, url="http://127.0.0.1:9/" + src.filename) for src in srcs)
                 for s, srcs in spec.files.items()}
        monkeypatch.setitem(data_mod.SPECS, name, replace(spec, files=files))
    return monkeypatch


def sigterm_in_step(monkeypatch, step: int):
    """Make Trainer.train_step send this process SIGTERM as step ``step`` + 1 starts (that step still
    completes, then the trainer checkpoints and stops); returns the original train_step."""
    import signal

    from hvae_fast.training.trainer import Trainer

    orig = Trainer.train_step

    def signalled(self, x):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, x)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    return orig
