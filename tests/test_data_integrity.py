"""Integrity of source files (issue 8): damaged local copies of the real data are refused by their
content digest with one error naming the file and the fix; CIFAR-10 and OMNIGLOT, which have no
content digest, are refused by their structure."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvae_fast import data as D
from hvae_fast.errors import HVAEError

from datatools import (SHARED, amat_bytes, cache_files, cifar_batch, isolated_env, need,  # noqa: F401
                       one_line_error, patch_spec, real, sha256, small_cifar, synthetic, write,
                       write_chardata)

LINE = 1568  # bytes per .amat line: 784 values and their separators


def assert_refused(excinfo, path: Path) -> None:
    """One one-line error that names the file, says it is damaged, and gives both fixes."""
    msg = one_line_error(excinfo)
    assert str(path) in msg and "damaged" in msg and "delete it" in msg and "restore" in msg, msg


# ------------------------------------------------------------------------------------------
# damaged copies of the real files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truncated_amat(tmp_path_factory) -> Path:
    """A data dir whose binarized_mnist_train.amat holds only its first 30,000 of 50,000 lines."""
    need("binarized_mnist")
    root = tmp_path_factory.mktemp("truncated")
    raw = gzip.open(SHARED / "binarized_mnist" / "binarized_mnist_train.amat.gz").read()
    write(root / "binarized_mnist" / "binarized_mnist_train.amat", raw[: 30_000 * LINE])
    return root


def test_truncated_amat_is_refused(truncated_amat):
    path = truncated_amat / "binarized_mnist" / "binarized_mnist_train.amat"
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "train", data_dir=truncated_amat, download=False)
    assert_refused(e, path)
    assert "binarized_mnist_train.amat has ad693b29" in str(e.value)  # the standard digest
    assert cache_files("*.npy") == []  # nothing parsed or cached from a damaged file


def test_truncated_amat_from_the_shell(truncated_amat, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "hvae_fast", "train", "binarized-mnist", "--data-dir", str(truncated_amat),
         "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HVAE_CACHE_DIR": str(tmp_path / "c")})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvae-fast: error: ")
    assert str(truncated_amat / "binarized_mnist" / "binarized_mnist_train.amat") in lines[0] and "delete it" in lines[0]


def test_flipped_amat_images_are_refused(real, tmp_path):
    """1,000 of the 10,000 validation images mirrored left to right: same size, same format, so
    only the digest can tell; a parse of the good copy in the same cache must not mask it."""
    good = real("binarized-mnist", "valid")
    raw = gzip.open(SHARED / "binarized_mnist" / "binarized_mnist_valid.amat.gz").read()
    lines = np.frombuffer(raw, np.uint8).reshape(10_000, LINE).copy()
    vals = lines[:, 0::2].reshape(10_000, 28, 28)
    vals[:1000] = vals[:1000, :, ::-1]
    lines[:, 0::2] = vals.reshape(10_000, 784)
    assert not np.array_equal(vals[:1000], good.images[:1000, 0].numpy())  # the damage is real
    path = write(tmp_path / "binarized_mnist" / "binarized_mnist_valid.amat", lines.tobytes())
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path, download=False)
    assert_refused(e, path)


def test_zeroed_mnist_images_are_refused(tmp_path):
    """5,000 of the 60,000 training images set to 0 in a well-formed .gz copy."""
    need("mnist")
    raw = bytearray(gzip.open(SHARED / "mnist" / "train-images-idx3-ubyte.gz").read())
    raw[16 : 16 + 5000 * 784] = bytes(5000 * 784)
    path = write(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", gzip.compress(bytes(raw), compresslevel=1))
    os.symlink(SHARED / "mnist" / "train-labels-idx1-ubyte.gz", tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    assert_refused(e, path)
    assert "uncompressed content" in str(e.value)


def test_damage_after_verification_is_refused(tmp_path, monkeypatch):
    """A verified file changed later (new size or mtime) is verified again, though its old parse
    is still in the cache."""
    x = np.random.default_rng(0).integers(0, 2, (4, 784))
    body = amat_bytes(x)
    patch_spec(monkeypatch, "binarized-mnist", digests={"binarized_mnist_test.amat": sha256(body)},
               file_sizes={"train": 50_000, "valid": 10_000, "test": 4})
    path = write(tmp_path / "binarized_mnist" / "binarized_mnist_test.amat", body)
    D.load_dataset("binarized-mnist", "test", data_dir=tmp_path, download=False)
    path.write_bytes(body[: 3 * LINE])  # cut to 3 lines
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "test", data_dir=tmp_path, download=False)
    assert_refused(e, path)


# ------------------------------------------------------------------------------------------
# structure: CIFAR-10 (the offline copy's bytes are not the publisher's) and chardata.mat
# ------------------------------------------------------------------------------------------


def test_small_cifar_copy_loads(tmp_path, monkeypatch):
    small_cifar(monkeypatch, tmp_path)
    sizes = [len(D.load_dataset("cifar10", s, data_dir=tmp_path, download=False)) for s in D.SPLITS]
    assert sizes == [45, 5, 10]


def _batch(n=10, seed=3, labels=None, data=None):
    b = cifar_batch(n, seed, labels=list(range(10)) if labels is None else labels)
    if data is not None:
        b[b"data"] = data
    return b


@pytest.mark.parametrize("damage, needle", [
    ({"data_batch_4": None}, "missing member(s) cifar-10-batches-py/data_batch_4"),  # batch count
    ({"data_batch_2": _batch(n=9, labels=list(range(9)))}, "uint8[9, 3072]"),  # a short batch
    ({"data_batch_3": _batch(data=np.zeros((10, 3000), np.uint8))}, "uint8[10, 3000]"),  # shape
    ({"test_batch": _batch(data=np.zeros((10, 3072), np.int16))}, "int16[10, 3072]"),  # dtype
    ({"data_batch_1": _batch(labels=list(range(9)))}, "labels[9]"),  # a label missing
    ({"test_batch": _batch(labels=list(range(1, 11)))}, "labels in 1..10"),  # label range
    ({"data_batch_5": _batch(labels=[0] * 10)}, "images per class [14, 4, 4"),  # class counts
], ids=["batch-count", "batch-size", "shape", "dtype", "label-count", "label-range", "class-counts"])
def test_damaged_cifar_is_refused(tmp_path, monkeypatch, damage, needle):
    path = small_cifar(monkeypatch, tmp_path, **damage)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("cifar10", "valid", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(path) in msg and needle in msg and "delete it" in msg, msg


@pytest.mark.parametrize("damage, needle", [
    ("test-count", "49 images of shape [1, 28, 28] for the omniglot test set"),
    ("train-count", "1399 images of shape [1, 28, 28] for the omniglot train set"),
    ("above-one", "'data' has values outside [0, 1]"),
    ("nan", "'testdata' has values outside [0, 1]"),
    ("rows", "'data' of shape [783, 1400]"),
    ("text", "'testdata' of shape"),
])
def test_damaged_chardata_is_refused(tmp_path, monkeypatch, damage, needle):
    import scipy.io

    synthetic(monkeypatch, "omniglot", train=1400, test=50)
    rng = np.random.default_rng(0)
    train, test = rng.random((1400, 28, 28)), rng.random((50, 28, 28))
    if damage == "test-count":
        test = test[:49]
    elif damage == "train-count":
        train = train[:1399]
    elif damage == "above-one":
        train[7, 3, 3] = 1.5
    elif damage == "nan":
        test[0, 0, 0] = np.nan
    path = write_chardata(tmp_path / "omniglot" / "chardata.mat", train, test)
    if damage in ("rows", "text"):
        mat = scipy.io.loadmat(str(path))
        mat = {"data": mat["data"][:783] if damage == "rows" else mat["data"],
               "testdata": mat["testdata"] if damage == "rows" else np.array(["not images"])}
        scipy.io.savemat(str(path), mat)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("omniglot", "train", data_dir=tmp_path, download=False)
    msg = one_line_error(e)
    assert str(path) in msg and needle in msg and "delete it" in msg, msg
