"""Tests for hvae_fast.data: real offline copies, caching, binarisation, batch streams, OMNIGLOT
layout, downloads over loopback HTTP, and corrupt files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hvae_fast import data as D
from hvae_fast.errors import HVAEError

from conftest import SHARED_DATA as SHARED

# Published class counts of the 60k MNIST training set and the 10k test set.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(subdir: str) -> Path:
    path = SHARED / subdir
    if not path.is_dir():
        pytest.skip(f"offline copy {path} is absent: set HVAE_DATA_DIR to a folder holding {subdir}/")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test gets its own parse cache and no inherited data dir."""
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / "parsed"))
    monkeypatch.delenv("HVAE_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """One parse cache for the real data, shared by this module's tests (parse once)."""
    return tmp_path_factory.mktemp("real-parsed")


@pytest.fixture
def real(real_cache, monkeypatch):
    """load(name, split) from the offline copies, with the module's shared parse cache."""
    monkeypatch.setenv("HVAE_CACHE_DIR", str(real_cache))

    def load(name, split):
        _need(D.SUBDIRS[name])
        return D.load_dataset(name, split, data_dir=SHARED, download=False)

    return load


@pytest.fixture(scope="module")
def cifar(real_cache):
    """The three CIFAR-10 splits, parsed once per session (decompressing the tarball is slow)."""
    _need("cifar10")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVAE_CACHE_DIR", str(real_cache))
        return {s: D.load_dataset("cifar10", s, data_dir=SHARED, download=False) for s in D.SPLITS}


# ------------------------------------------------------------------------------------------
# helpers: synthetic files
# ------------------------------------------------------------------------------------------


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


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def cache_files(pattern: str) -> list[Path]:
    return sorted(D.resolve_cache_dir().glob(pattern))


# ------------------------------------------------------------------------------------------
# directories and names
# ------------------------------------------------------------------------------------------


def test_resolve_dirs(monkeypatch, tmp_path):
    import platformdirs

    root = Path(platformdirs.user_cache_dir("hvae-fast"))
    assert D.resolve_data_dir(None) == root / "data"
    monkeypatch.setenv("HVAE_DATA_DIR", str(tmp_path / "env"))
    assert D.resolve_data_dir(None) == tmp_path / "env"
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    assert D.resolve_cache_dir() == tmp_path / "parsed"
    monkeypatch.delenv("HVAE_CACHE_DIR")
    assert D.resolve_cache_dir() == root / "parsed"
    assert D.SUBDIRS == {"mnist": "mnist", "binarized-mnist": "binarized_mnist",
                         "omniglot": "omniglot", "cifar10": "cifar10"}


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(HVAEError) as e:
        D.load_dataset("svhn", "train", data_dir=tmp_path)
    assert all(n in one_line_error(e) for n in D.DATASETS)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "validation", data_dir=tmp_path)
    assert all(s in one_line_error(e) for s in ("train", "valid", "test"))


def test_sources_table():
    assert D.DATASETS == ("mnist", "binarized-mnist", "omniglot", "cifar10")
    assert set(D.SOURCES) == set(D.DATASETS)
    urls = {name: [u for _, u, _, _ in entries] for name, entries in D.SOURCES.items()}
    assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in urls["mnist"])
    assert len(urls["mnist"]) == 4 and len(urls["binarized-mnist"]) == 3
    assert D.SOURCES["cifar10"][0][2:] == ("md5", "c58f30108f718f92721af3b95e74349a")
    assert D.SOURCES["omniglot"][0][2:] == (None, None)
    for _, _, kind, checksum in D.SOURCES["mnist"] + D.SOURCES["binarized-mnist"]:
        assert kind in ("sha256", "sha256-gunzip") and len(checksum) == 64


# ------------------------------------------------------------------------------------------
# the real offline copies
# ------------------------------------------------------------------------------------------


def test_mnist_real(real):
    ds = {s: real("mnist", s) for s in D.SPLITS}
    for split, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        d = ds[split]
        assert len(d) == n and d.images.shape == (n, 1, 28, 28) and d.image_shape == (1, 28, 28)
        assert d.images.dtype == torch.uint8 and int(d.images.max()) == 255 and int(d.images.min()) == 0
        assert d.labels.dtype == torch.int64 and d.labels.shape == (n,)
        assert d.binarize == "dynamic" and d.likelihood == "bernoulli" and d.name == "mnist"
        assert 0.11 < d.images.sum(dtype=torch.int64).item() / d.images.numel() / 255 < 0.15
    counts = {s: torch.bincount(ds[s].labels, minlength=10).tolist() for s in D.SPLITS}
    assert counts["test"] == MNIST_TEST_COUNTS
    assert [a + b for a, b in zip(counts["train"], counts["valid"])] == MNIST_TRAIN_COUNTS
    assert all(700 < c < 1400 for c in counts["valid"])  # a random 1/6 of each class
    # train/valid: disjoint, covering the 60k file, exactly the seeded construction
    tr, va = ds["train"].indices.numpy(), ds["valid"].indices.numpy()
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.union1d(tr, va), np.arange(60_000))
    want_tr, want_va = D.split_indices(60_000, 10_000, seed=0)
    assert np.array_equal(tr, want_tr) and np.array_equal(va, want_va)
    raw = D._parse_idx(SHARED / "mnist" / "train-images-idx3-ubyte.gz", 3)
    assert np.array_equal(ds["valid"].images[:, 0].numpy(), raw[va])
    assert np.array_equal(ds["train"].images[:500, 0].numpy(), raw[tr[:500]])
    assert ds["test"].indices is None


def test_mnist_valid_deterministic_and_cached(real, monkeypatch, tmp_path):
    first = real("mnist", "valid")
    assert cache_files("mnist-valid-*.images.npy") and cache_files("mnist-train-*.images.npy")
    # A second load reads only the cache: the parser must not run.
    monkeypatch.setattr(D, "_parse_idx", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    t0 = time.perf_counter()
    again = real("mnist", "valid")
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    monkeypatch.undo()
    # A fresh parse (empty cache) gives the same validation split.
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = D.load_dataset("mnist", "valid", data_dir=SHARED, download=False)
    assert torch.equal(first.images, fresh.images) and torch.equal(first.indices, fresh.indices)


def test_binarized_mnist_real(real, monkeypatch):
    ds = {s: real("binarized-mnist", s) for s in D.SPLITS}
    for split, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        d = ds[split]
        assert d.images.shape == (n, 1, 28, 28) and d.images.dtype == torch.uint8
        assert int(d.images.min()) == 0 and int(d.images.max()) == 1
        assert 0.12 < d.images.sum(dtype=torch.int64).item() / d.images.numel() < 0.14
        assert d.labels is None and d.binarize == "static" and d.likelihood == "bernoulli"
        x = D.to_model_input(d.images[:8], d.binarize, None)
        assert x.dtype == torch.float32 and torch.equal(x, d.images[:8].float())
    assert len(cache_files("binarized-mnist-*.images.npy")) == 3
    monkeypatch.setattr(D, "_parse_amat", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    t0 = time.perf_counter()
    again = real("binarized-mnist", "train")
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(again.images, ds["train"].images)


def test_cifar10_real(cifar, real, monkeypatch):
    for split, n in (("train", 45_000), ("valid", 5_000), ("test", 10_000)):
        d = cifar[split]
        assert d.images.shape == (n, 3, 32, 32) and d.images.dtype == torch.uint8
        assert d.labels.dtype == torch.int64 and d.labels.shape == (n,)
        assert d.binarize == "none" and d.likelihood == "logistic"
        assert int(d.images.min()) == 0 and int(d.images.max()) == 255
    counts = {s: torch.bincount(cifar[s].labels, minlength=10).tolist() for s in D.SPLITS}
    assert counts["test"] == [1000] * 10
    assert [a + b for a, b in zip(counts["train"], counts["valid"])] == [5000] * 10
    assert all(400 < c < 600 for c in counts["valid"])
    # Channel layout: CIFAR's red mean (~125) is well above its blue mean (~114); a wrong
    # reshape of the 1024R/1024G/1024B rows would mix channels and erase the gap.
    means = cifar["valid"].images.float().mean(dim=(0, 2, 3))
    assert means[0] - means[2] > 5
    tr, va = cifar["train"].indices.numpy(), cifar["valid"].indices.numpy()
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).size == 50_000
    want_tr, want_va = D.split_indices(50_000, 5_000, seed=0)
    assert np.array_equal(tr, want_tr) and np.array_equal(va, want_va)
    x = D.to_model_input(cifar["test"].images[:64], "none")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    # second load: cache only, fast, identical
    assert cache_files("cifar10-train-*.images.npy")
    monkeypatch.setattr(D, "_parse_cifar_tar", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    for split in D.SPLITS:
        t0 = time.perf_counter()
        again = real("cifar10", split)
        assert time.perf_counter() - t0 < 1.0
        assert torch.equal(again.images[::97], cifar[split].images[::97])
        assert torch.equal(again.labels, cifar[split].labels)


# ------------------------------------------------------------------------------------------
# model input
# ------------------------------------------------------------------------------------------


def test_dynamic_binarisation():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (500, 1, 28, 28), dtype=np.uint8))
    images[0] = 0
    images[1] = 255
    g = torch.Generator().manual_seed(1)
    b = D.to_model_input(images, "dynamic", g)
    assert b.dtype == torch.float32 and b.shape == images.shape
    assert set(torch.unique(b).tolist()) == {0.0, 1.0}
    assert torch.all(b[0] == 0) and torch.all(b[1] == 1)  # p = 0 and p = 1 are exact
    # 392k Bernoulli draws: the std of the mean is < 0.0008; allow 0.004 (5 sigma).
    assert abs(b.mean().item() - (images.float() / 255).mean().item()) < 0.004
    same = D.to_model_input(images, "dynamic", torch.Generator().manual_seed(1))
    other = D.to_model_input(images, "dynamic", torch.Generator().manual_seed(2))
    assert torch.equal(b, same) and not torch.equal(b, other)
    # float grey levels (omniglot) are probabilities themselves
    p = torch.full((200, 1, 28, 28), 0.3)
    fb = D.to_model_input(p, "dynamic", torch.Generator().manual_seed(0))
    assert abs(fb.mean().item() - 0.3) < 0.005


def test_static_and_logistic_input():
    x = torch.tensor([0, 1, 1, 0], dtype=torch.uint8)
    assert torch.equal(D.to_model_input(x, "static"), x.float())
    y = D.to_model_input(torch.tensor([0, 255, 51], dtype=torch.uint8), "none")
    assert torch.allclose(y, torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    with pytest.raises(HVAEError):
        D.to_model_input(x, "threshold")


def test_dynamic_binarisation_real_mnist(real):
    d = real("mnist", "test")
    batches = list(D.eval_batches(d, 1000, seed=0))
    assert len(batches) == 10
    b = torch.cat(batches)
    assert b.dtype == torch.float32 and bool(((b == 0) | (b == 1)).all())
    # 7.8M draws: the std of the mean is < 0.0002; allow 0.002.
    assert abs(b.mean().item() - d.images.sum(dtype=torch.int64).item() / d.images.numel() / 255) < 0.002
    again = torch.cat(list(D.eval_batches(d, 1000, seed=0)))
    other = torch.cat(list(D.eval_batches(d, 1000, seed=1)))
    assert torch.equal(b, again) and not torch.equal(b, other)


# ------------------------------------------------------------------------------------------
# batch streams
# ------------------------------------------------------------------------------------------


def id_dataset(n: int = 103) -> D.ImageDataset:
    """Image i holds the value i everywhere: model input (x + 1) * 127.5 recovers the index."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return D.ImageDataset("ids", "train", images, None, "none")


def ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def test_batch_stream_epochs():
    ds = id_dataset(103)
    s = D.BatchStream(ds, 10, seed=3)
    assert s.batches_per_epoch == 10
    epochs = [[i for _ in range(10) for i in ids(next(s))] for _ in range(3)]
    for e in epochs:
        assert len(e) == 100 and len(set(e)) == 100  # a permutation, last 3 dropped
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0
    full = D.BatchStream(ds, 10, seed=3, drop_last=False)
    sizes = [len(next(full)) for _ in range(11)]
    assert sizes == [10] * 10 + [3]
    ordered = D.BatchStream(ds, 10, seed=3, shuffle=False, drop_last=False)
    assert [i for _ in range(11) for i in ids(next(ordered))] == list(range(103))
    assert ids(next(D.BatchStream(ds, 10, seed=3))) == ids(next(D.BatchStream(ds, 10, seed=3)))
    assert ids(next(D.BatchStream(ds, 10, seed=3))) != ids(next(D.BatchStream(ds, 10, seed=4)))


@pytest.mark.parametrize("n_first", [0, 7, 13, 30])
def test_batch_stream_resume(n_first):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (95, 1, 8, 8), dtype=np.uint8))
    ds = D.ImageDataset("toy", "train", images, None, "dynamic")
    s = D.BatchStream(ds, 10, seed=11)  # 9 batches an epoch
    for _ in range(n_first):
        next(s)
    state = s.state_dict()
    assert state["epoch"] == n_first // 9 and state["position"] == n_first % 9
    rest = [next(s) for _ in range(15)]
    resumed = D.BatchStream(ds, 10, seed=11)
    resumed.load_state_dict(dict(state))
    for a, b in zip(rest, (next(resumed) for _ in range(15))):
        assert torch.equal(a, b)  # same images and the same binarisation draws
    # consecutive batches are different draws
    assert not torch.equal(rest[0], rest[1])
    with pytest.raises(HVAEError, match="seed"):
        D.BatchStream(ds, 10, seed=12).load_state_dict(state)


def test_eval_batches_and_batch_size_errors():
    ds = id_dataset(103)
    batches = list(D.eval_batches(ds, 10))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert [i for b in batches for i in ids(b)] == list(range(103))
    for bad in (104, 0):
        with pytest.raises(HVAEError) as e:
            D.BatchStream(ds, bad, seed=0)
        assert "batch size" in one_line_error(e)
        with pytest.raises(HVAEError):
            D.eval_batches(ds, bad)


# ------------------------------------------------------------------------------------------
# binarized-mnist .amat parsing and cache invalidation
# ------------------------------------------------------------------------------------------


def test_amat_cache_invalidated_when_source_changes(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "data" / "binarized_mnist" / "binarized_mnist_test.amat"
    x1 = rng.integers(0, 2, (3, 784))
    write(src, amat_bytes(x1))
    d1 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert np.array_equal(d1.images.reshape(3, 784).numpy(), x1)
    first_cache = cache_files("binarized-mnist-test-*.npy")
    assert len(first_cache) == 1
    # same size, different content, new mtime -> re-parsed
    x2 = 1 - x1
    write(src, amat_bytes(x2))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    d2 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert np.array_equal(d2.images.reshape(3, 784).numpy(), x2)
    # different size -> re-parsed; the stale cache entries are gone
    x3 = rng.integers(0, 2, (5, 784))
    write(src, amat_bytes(x3, eol="\r\n"))
    d3 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert np.array_equal(d3.images.reshape(5, 784).numpy(), x3)
    now = cache_files("binarized-mnist-test-*.npy")
    assert len(now) == 1 and now != first_cache
    # unchanged source -> cache hit
    d4 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert cache_files("binarized-mnist-test-*.npy") == now and torch.equal(d3.images, d4.images)


def test_amat_gz_and_readonly_data_dir(tmp_path):
    x = np.random.default_rng(1).integers(0, 2, (4, 784))
    folder = tmp_path / "data" / "binarized_mnist"
    write(folder / "binarized_mnist_valid.amat.gz", gzip.compress(amat_bytes(x)))
    folder.chmod(0o555)
    try:
        d = D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path / "data", download=False)
    finally:
        folder.chmod(0o755)
    assert np.array_equal(d.images.reshape(4, 784).numpy(), x)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"0 1 2 " + b"0 " * 781 + b"\n", "'2'"),
        (b"0 1 " * 392 + b"\n" + b"0 1 " * 391 + b"0\n", "values on"),  # 784 + 783 values
        (b"", "values on"),
        (b"0 " * 783 + b"2\n", "'2'"),  # the publisher's exact layout, one bad value
    ],
)
def test_amat_corrupt(tmp_path, content, needle):
    src = write(tmp_path / "binarized_mnist" / "binarized_mnist_train.amat", content)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "train", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(src) in msg and needle in msg and "delete it" in msg


# ------------------------------------------------------------------------------------------
# OMNIGLOT (synthetic chardata.mat in the IWAE layout)
# ------------------------------------------------------------------------------------------


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, **extra) -> Path:
    import scipy.io

    def colmajor(imgs):  # each column an image stored column-major
        return imgs.transpose(0, 2, 1).reshape(len(imgs), 784).T.astype(np.float64)

    path.parent.mkdir(parents=True, exist_ok=True)
    mats = {"data": colmajor(train), "testdata": colmajor(test)}
    mats.update(extra)
    mats = {k: v for k, v in mats.items() if v is not None}
    scipy.io.savemat(str(path), mats)
    return path


def test_omniglot_layout_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.random((1400, 28, 28))
    test = rng.random((50, 28, 28))
    train[0] = 0.0
    train[0, 0, :] = 1.0  # image 0: only its top row is lit
    write_chardata(tmp_path / "omniglot" / "chardata.mat", train, test)
    ds = {s: D.load_dataset("omniglot", s, data_dir=tmp_path, download=False) for s in D.SPLITS}
    assert [len(ds[s]) for s in D.SPLITS] == [55, 1345, 50]
    for d in ds.values():
        assert d.images.dtype == torch.float32 and d.image_shape == (1, 28, 28)
        assert 0 <= d.images.min() and d.images.max() <= 1
        assert d.labels is None and d.binarize == "dynamic" and d.likelihood == "bernoulli"
    want_tr, want_va = D.split_indices(1400, 1345, seed=123)
    perm = np.random.RandomState(123).permutation(1400)
    assert np.array_equal(np.sort(perm[:1345]), want_va)
    assert np.array_equal(ds["valid"].indices.numpy(), want_va)
    assert np.array_equal(ds["train"].indices.numpy(), want_tr)
    # orientation: row-major images exactly as written
    for split in ("train", "valid"):
        idx = ds[split].indices.numpy()
        assert np.array_equal(ds[split].images[:, 0].numpy(), train[idx].astype(np.float32))
    assert np.array_equal(ds["test"].images[:, 0].numpy(), test.astype(np.float32))
    split0 = "valid" if 0 in want_va else "train"
    img0 = ds[split0].images[int(np.flatnonzero(ds[split0].indices.numpy() == 0)[0]), 0]
    assert torch.all(img0[0] == 1) and img0[1:].sum() == 0  # top row, not left column
    b = next(D.BatchStream(ds["valid"], 100, seed=0))
    assert set(torch.unique(b).tolist()) <= {0.0, 1.0}


def test_omniglot_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    path = write_chardata(tmp_path / "omniglot" / "chardata.mat", rng.random((1400, 28, 28)), rng.random((5, 28, 28)))
    import scipy.io

    scipy.io.savemat(str(path), {"data": scipy.io.loadmat(str(path))["data"]})  # no 'testdata'
    with pytest.raises(HVAEError) as e:
        D.load_dataset("omniglot", "train", data_dir=tmp_path, download=False)
    assert "chardata.mat" in one_line_error(e) and "testdata" in str(e.value)
    path.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("omniglot", "test", data_dir=tmp_path, download=False)
    assert str(path) in one_line_error(e)


# ------------------------------------------------------------------------------------------
# downloads over loopback HTTP
# ------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base_url): a loopback HTTP server (127.0.0.1 only) serving a tmp folder."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_good(http_root, tmp_path, monkeypatch):
    served, base = http_root
    rng = np.random.default_rng(0)
    # binarized-mnist valid: plain sha256
    x = rng.integers(0, 2, (6, 784))
    body = write(served / "bm_valid.amat", amat_bytes(x)).read_bytes()
    # mnist test: sha256 of the gunzipped content
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    write(served / "ti.gz", gzip.compress(idx_bytes(imgs)))
    write(served / "tl.gz", gzip.compress(idx_bytes(labels)))
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    monkeypatch.setitem(D.SOURCES, "binarized-mnist", [
        ("binarized_mnist_valid.amat", base + "bm_valid.amat", "sha256", sha(body))])
    monkeypatch.setitem(D.SOURCES, "mnist", D.SOURCES["mnist"][:2] + [
        ("t10k-images-idx3-ubyte.gz", base + "ti.gz", "sha256-gunzip", sha(idx_bytes(imgs))),
        ("t10k-labels-idx1-ubyte.gz", base + "tl.gz", "sha256-gunzip", sha(idx_bytes(labels)))])
    data_dir = tmp_path / "data"
    d = D.load_dataset("binarized-mnist", "valid", data_dir=data_dir)
    landed = data_dir / "binarized_mnist" / "binarized_mnist_valid.amat"
    assert landed.read_bytes() == body
    assert np.array_equal(d.images.reshape(6, 784).numpy(), x)
    m = D.load_dataset("mnist", "test", data_dir=data_dir)
    assert np.array_equal(m.images[:, 0].numpy(), imgs) and m.labels.tolist() == labels.tolist()
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # no temp files left
    # file:// URLs work too
    monkeypatch.setitem(D.SOURCES, "binarized-mnist", [
        ("binarized_mnist_valid.amat", (served / "bm_valid.amat").as_uri(), "sha256", sha(body))])
    D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path / "data2")
    assert (tmp_path / "data2" / "binarized_mnist" / "binarized_mnist_valid.amat").read_bytes() == body


@pytest.mark.parametrize("name, split, filename, kind", [
    ("binarized-mnist", "test", "binarized_mnist_test.amat", "sha256"),
    ("mnist", "test", "t10k-images-idx3-ubyte.gz", "sha256-gunzip"),
    ("cifar10", "test", "cifar-10-python.tar.gz", "md5"),
])
def test_download_bad_checksum(http_root, tmp_path, monkeypatch, name, split, filename, kind):
    served, base = http_root
    write(served / "payload", gzip.compress(b"<html>not the dataset</html>"))
    expected = "0" * (32 if kind == "md5" else 64)
    monkeypatch.setitem(D.SOURCES, name, [(filename, base + "payload", kind, expected)] * (
        4 if name == "mnist" else 1))
    with pytest.raises(HVAEError) as e:
        D.load_dataset(name, split, data_dir=tmp_path / "data")
    msg = one_line_error(e)
    assert filename in msg and expected in msg and "deleted" in msg
    assert list((tmp_path / "data" / D.SUBDIRS[name]).iterdir()) == []  # nothing left behind


def test_download_omniglot_unloadable(http_root, tmp_path, monkeypatch):
    served, base = http_root
    write(served / "chardata.mat", b"404: Not Found")
    monkeypatch.setitem(D.SOURCES, "omniglot", [("chardata.mat", base + "chardata.mat", None, None)])
    with pytest.raises(HVAEError) as e:
        D.load_dataset("omniglot", "train", data_dir=tmp_path / "data")
    assert "chardata.mat" in one_line_error(e) and "no checksum" in str(e.value)
    assert list((tmp_path / "data" / "omniglot").iterdir()) == []


def test_download_offline_and_disabled(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SOURCES, "binarized-mnist", [
        ("binarized_mnist_train.amat", "http://127.0.0.1:9/binarized_mnist_train.amat", "sha256", "0" * 64)])
    data_dir = tmp_path / "data"
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "train", data_dir=data_dir)
    msg = one_line_error(e)
    want = str((data_dir / "binarized_mnist" / "binarized_mnist_train.amat").absolute())
    assert want in msg and "--data-dir" in msg and "HVAE_DATA_DIR" in msg and "failed" in msg
    assert list((data_dir / "binarized_mnist").iterdir()) == []
    with pytest.raises(HVAEError) as e:
        D.load_dataset("cifar10", "train", data_dir=data_dir, download=False)
    msg = one_line_error(e)
    assert "cifar-10-python.tar.gz" in msg and "--data-dir" in msg and str(data_dir.absolute()) in msg


# ------------------------------------------------------------------------------------------
# corrupt source files
# ------------------------------------------------------------------------------------------


def mnist_test_files(folder: Path, images_gz: bytes) -> Path:
    labels = np.arange(20, dtype=np.uint8) % 10
    write(folder / "mnist" / "t10k-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(labels)))
    return write(folder / "mnist" / "t10k-images-idx3-ubyte.gz", images_gz)


@pytest.mark.parametrize("kind", ["truncated-gzip", "bad-magic", "wrong-length", "not-gzip"])
def test_mnist_corrupt(tmp_path, kind):
    imgs = np.zeros((20, 28, 28), dtype=np.uint8)
    good = idx_bytes(imgs)
    content, needle = {
        "truncated-gzip": (gzip.compress(good)[:-40], "gzip"),
        "bad-magic": (gzip.compress(b"\x00\x00\x08\x04" + good[4:]), "magic"),
        "wrong-length": (gzip.compress(good[:-784]), "bytes"),
        "not-gzip": (b"PK\x03\x04 a zip, not a gzip", "gzip"),
    }[kind]
    path = mnist_test_files(tmp_path, content)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(path) in msg and needle in msg and "re-run" in msg


def test_mnist_count_mismatch(tmp_path):
    mnist_test_files(tmp_path, gzip.compress(idx_bytes(np.zeros((19, 28, 28), np.uint8))))
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert "19 images" in one_line_error(e) and "20 labels" in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["missing-batch", "bad-pickle", "evil-pickle", "no-data-key", "not-a-tar"])
def test_cifar_corrupt(tmp_path, kind):
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    members = {f"data_batch_{i}": cifar_batch(10, i) for i in range(1, 6)}
    members["test_batch"] = cifar_batch(10, 9)
    needle = {"missing-batch": "data_batch_5", "bad-pickle": "data_batch_2",
              "evil-pickle": "disallowed", "no-data-key": "data_batch_3", "not-a-tar": "tar"}[kind]
    if kind == "missing-batch":
        del members["data_batch_5"]
    elif kind == "bad-pickle":
        members["data_batch_2"] = b"\x80\x02}q\x00(garbage"
    elif kind == "evil-pickle":
        members["test_batch"] = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    elif kind == "no-data-key":
        members["data_batch_3"] = {b"labels": [1, 2]}
    if kind == "not-a-tar":
        write(path, os.urandom(4096))
    else:
        cifar_tar(path, members)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(path) in msg and needle in msg and "publisher's file" in msg


def test_cifar_synthetic_parse(tmp_path):
    """The parser's layout on a small tarball: rows of 1024 R, 1024 G, 1024 B values."""
    members = {f"data_batch_{i}": cifar_batch(10, i) for i in range(1, 6)}
    members["test_batch"] = cifar_batch(10, 9)
    path = cifar_tar(tmp_path / "c.tar.gz", members)
    parsed = D._parse_cifar_tar(path)
    x, y = parsed["train"]
    assert x.shape == (50, 3, 32, 32) and y.tolist() == sum((members[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    row = members["data_batch_2"][b"data"][3]
    assert np.array_equal(x[13, 1], row[1024:2048].reshape(32, 32))
    assert np.array_equal(parsed["test"][0][0, 2, 0], members["test_batch"][b"data"][0][2048:2080])
    with pytest.raises(HVAEError, match="only 50 training images"):  # the 5,000-image valid split needs more
        D._build_cifar([path], "train")
