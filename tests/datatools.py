"""Helpers and fixtures shared by the tests of hvae_fast.data: synthetic files in the publishers'
formats, records patched to fit small synthetic copies, and the offline copies."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hvae_fast import data as D

from conftest import SHARED_DATA as SHARED


def need(subdir: str) -> Path:
    path = SHARED / subdir
    if not path.is_dir():
        pytest.skip(f"offline copy {path} is absent: set HVAE_DATA_DIR to a folder holding {subdir}/")
    return SHARED


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Every test gets its own cache and no inherited data dir."""
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / "parsed"))
    monkeypatch.delenv("HVAE_DATA_DIR", raising=False)


@pytest.fixture
def real(tmp_path_factory, monkeypatch):
    """load(name, split) from the offline copies, with one cache for the whole test session (so
    each real file is hashed and parsed once)."""
    cache = tmp_path_factory.getbasetemp() / "real-parsed"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("HVAE_CACHE_DIR", str(cache))

    def load(name, split):
        need(D.SPECS[name].folder)
        return D.load_dataset(name, split, data_dir=SHARED, download=False)

    return load


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def patch_spec(monkeypatch, name: str, *, digests: dict[str, str | None] | None = None,
               urls: dict[str, str] | None = None, **changes) -> D.DatasetSpec:
    """Replace dataset ``name``'s record for this test. ``digests``/``urls``: filename -> new sha256
    (None: no standard digest) / URL; any other keyword replaces that field (file_sizes, ...)."""
    spec = D.SPECS[name]
    digests, urls = digests or {}, urls or {}

    def fix(src):
        return replace(src, sha256=digests.get(src.filename, src.sha256), url=urls.get(src.filename, src.url))

    files = {s: tuple(fix(src) for src in srcs) for s, srcs in spec.files.items()}
    new = replace(spec, files=files, **changes)
    monkeypatch.setitem(D.SPECS, name, new)
    return new


def synthetic(monkeypatch, name: str, **file_sizes) -> D.DatasetSpec:
    """Fit ``name``'s record to a small synthetic copy: no standard digests, these image counts."""
    spec = D.SPECS[name]
    return patch_spec(monkeypatch, name, digests={s.filename: None for s in spec.sources},
                      file_sizes={**spec.file_sizes, **file_sizes})


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def amat_bytes(x: np.ndarray, eol: str = "\n") -> bytes:
    return "".join(" ".join(str(int(v)) for v in row) + eol for row in x.reshape(len(x), -1)).encode()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def cifar_tar(path: Path, members: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def cifar_batch(n: int, seed: int, labels: list[int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": labels if labels is not None else [int(v) for v in rng.integers(0, 10, n)]}


def small_cifar(monkeypatch, folder: Path, **damage) -> Path:
    """A balanced 5 x 10 + 10 image CIFAR-10 tarball at folder/cifar10/ and a record that fits it
    (5 validation images); ``damage``: member name -> replacement object or pickled bytes."""
    patch_spec(monkeypatch, "cifar10", file_sizes={"train": 50, "test": 10}, valid_split=(5, 0),
               class_counts={"train": (5,) * 10, "test": (1,) * 10})
    members = {f"data_batch_{i}": cifar_batch(10, i, labels=list(range(10))) for i in range(1, 6)}
    members["test_batch"] = cifar_batch(10, 9, labels=list(range(9, -1, -1)))
    for name, obj in damage.items():
        if obj is None:
            del members[name]
        else:
            members[name] = obj
    return cifar_tar(folder / "cifar10" / "cifar-10-python.tar.gz", members)


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, **extra) -> Path:
    """A chardata.mat in the IWAE layout: 784 x N, each column a column-major image."""
    import scipy.io

    def colmajor(imgs):
        return imgs.transpose(0, 2, 1).reshape(len(imgs), 784).T.astype(np.float64)

    path.parent.mkdir(parents=True, exist_ok=True)
    mats = {"data": colmajor(train), "testdata": colmajor(test)}
    mats.update(extra)
    scipy.io.savemat(str(path), {k: v for k, v in mats.items() if v is not None})
    return path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def cache_files(pattern: str) -> list[Path]:
    return sorted(D.resolve_cache_dir().glob(pattern))
