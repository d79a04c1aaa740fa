"""hvae_fast.data.parsers on the real offline copies (shapes, class counts, splits, channel layout)
and on small synthetic files in each publisher's layout, good and malformed."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hvae_fast import data as D
from hvae_fast.data import parsers
from hvae_fast.errors import HVAEError

from datatools import (SHARED, cache_files, cifar_batch, cifar_tar, idx_bytes,  # noqa: F401
                       isolated_env, need, one_line_error, real, small_cifar, synthetic, write,
                       write_chardata)

# Published class counts of the 60k MNIST training set and the 10k test set.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The three CIFAR-10 splits, parsed once per session (decompressing the tarball is slow)."""
    need("cifar10")
    cache = tmp_path_factory.getbasetemp() / "real-parsed"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVAE_CACHE_DIR", str(cache))
        return {s: D.load_dataset("cifar10", s, data_dir=SHARED, download=False) for s in D.SPLITS}


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
    raw = parsers.parse_idx(SHARED / "mnist" / "train-images-idx3-ubyte.gz", 3)
    assert np.array_equal(ds["valid"].images[:, 0].numpy(), raw[va])
    assert np.array_equal(ds["train"].images[:500, 0].numpy(), raw[tr[:500]])
    assert ds["test"].indices is None



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
    monkeypatch.setattr(parsers, "parse_amat", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    again = real("binarized-mnist", "train")
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
    monkeypatch.setattr(parsers, "parse_cifar_tar", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    for split in D.SPLITS:
        again = real("cifar10", split)
        assert torch.equal(again.images[::97], cifar[split].images[::97])
        assert torch.equal(again.labels, cifar[split].labels)


# ------------------------------------------------------------------------------------------
# binarized-mnist .amat
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"0 1 2 " + b"0 " * 781 + b"\n", "'2'"),
        (b"0 1 " * 392 + b"\n" + b"0 1 " * 391 + b"0\n", "values on"),  # 784 + 783 values
        (b"", "values on"),
        (b"0 " * 783 + b"2\n", "'2'"),  # the publisher's exact layout, one bad value
    ],
)
def test_amat_corrupt(tmp_path, monkeypatch, content, needle):
    synthetic(monkeypatch, "binarized-mnist", train=1)
    src = write(tmp_path / "binarized_mnist" / "binarized_mnist_train.amat", content)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "train", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(src) in msg and needle in msg and "delete it" in msg


# ------------------------------------------------------------------------------------------
# OMNIGLOT (synthetic chardata.mat in the IWAE layout)
# ------------------------------------------------------------------------------------------


def test_omniglot_layout_and_splits(tmp_path, monkeypatch):
    synthetic(monkeypatch, "omniglot", train=1400, test=50)
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
    want_tr, want_va = D.split_indices(1400, 1345, seed=123, last=True)
    perm = np.random.RandomState(123).permutation(1400)
    assert np.array_equal(np.sort(perm[-1345:]), want_va)  # IWAE's protocol: the LAST 1,345
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


def test_omniglot_corrupt(tmp_path, monkeypatch):
    synthetic(monkeypatch, "omniglot", train=1400, test=5)
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
# MNIST IDX and CIFAR-10 tarballs
# ------------------------------------------------------------------------------------------


def mnist_test_files(folder: Path, images_gz: bytes) -> Path:
    labels = np.arange(20, dtype=np.uint8) % 10
    write(folder / "mnist" / "t10k-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(labels)))
    return write(folder / "mnist" / "t10k-images-idx3-ubyte.gz", images_gz)


@pytest.mark.parametrize("kind", ["truncated-gzip", "bad-magic", "wrong-length", "not-gzip"])
def test_mnist_corrupt(tmp_path, monkeypatch, kind):
    synthetic(monkeypatch, "mnist", test=20)
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


def test_mnist_count_mismatch(tmp_path, monkeypatch):
    synthetic(monkeypatch, "mnist", test=20)
    mnist_test_files(tmp_path, gzip.compress(idx_bytes(np.zeros((19, 28, 28), np.uint8))))
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert "19 images" in one_line_error(e) and "20 labels" in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["missing-batch", "bad-pickle", "evil-pickle", "no-data-key", "not-a-tar"])
def test_cifar_corrupt(tmp_path, monkeypatch, kind):
    needle = {"missing-batch": "data_batch_5", "bad-pickle": "data_batch_2",
              "evil-pickle": "disallowed", "no-data-key": "data_batch_3", "not-a-tar": "tar"}[kind]
    damage = {"missing-batch": {"data_batch_5": None},
              "bad-pickle": {"data_batch_2": b"\x80\x02}q\x00(garbage"},
              "evil-pickle": {"test_batch": pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)},
              "no-data-key": {"data_batch_3": {b"labels": [1, 2]}},
              "not-a-tar": {}}[kind]
    path = small_cifar(monkeypatch, tmp_path, **damage)
    if kind == "not-a-tar":
        write(path, os.urandom(4096))
    with pytest.raises(HVAEError) as e:
        D.load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(path) in msg and needle in msg and "publisher's file" in msg


def test_cifar_synthetic_parse(tmp_path):
    """The parser's layout on a small tarball: rows of 1024 R, 1024 G, 1024 B values."""
    members = {f"data_batch_{i}": cifar_batch(10, i) for i in range(1, 6)}
    members["test_batch"] = cifar_batch(10, 9)
    path = cifar_tar(tmp_path / "c.tar.gz", members)
    parsed = parsers.parse_cifar_tar(path, {"train": 50, "test": 10})
    x, y = parsed["train"]
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == sum((members[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    row = members["data_batch_2"][b"data"][3]
    assert np.array_equal(x[13, 1], row[1024:2048].reshape(32, 32))
    assert np.array_equal(parsed["test"][0][0, 2, 0], members["test_batch"][b"data"][0][2048:2080])
