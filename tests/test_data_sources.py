"""hvae_fast.data.datasets and .sources: the records, the data dir, and downloads over loopback
HTTP (good, bad checksum, unparseable, offline)."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from hvae_fast import data as D
from hvae_fast.data import sources
from hvae_fast.errors import HVAEError

from datatools import (amat_bytes, idx_bytes, isolated_env, one_line_error, patch_spec, sha256,  # noqa: F401
                       synthetic, write)


# ------------------------------------------------------------------------------------------
# records, directories and names
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
    assert {n: s.folder for n, s in D.SPECS.items()} == {
        "mnist": "mnist", "binarized-mnist": "binarized_mnist", "omniglot": "omniglot", "cifar10": "cifar10"}


def test_unknown_name_and_split(tmp_path):
    for bad in (lambda: D.load_dataset("svhn", "train", data_dir=tmp_path), lambda: D.image_shape("svhn")):
        with pytest.raises(HVAEError) as e:
            bad()
        assert all(n in one_line_error(e) for n in D.DATASETS)
    with pytest.raises(HVAEError) as e:
        D.load_dataset("mnist", "validation", data_dir=tmp_path)
    assert all(s in one_line_error(e) for s in ("train", "valid", "test"))


def test_records():
    assert D.DATASETS == ("mnist", "binarized-mnist", "omniglot", "cifar10")
    assert D.get_spec("Binarized_MNIST") is D.SPECS["binarized-mnist"]
    shapes = {n: D.image_shape(n) for n in D.DATASETS}
    assert shapes == {"mnist": (1, 28, 28), "binarized-mnist": (1, 28, 28), "omniglot": (1, 28, 28),
                      "cifar10": (3, 32, 32)}
    assert {n: (s.binarize, s.likelihood) for n, s in D.SPECS.items()} == {
        "mnist": ("dynamic", "bernoulli"), "binarized-mnist": ("static", "bernoulli"),
        "omniglot": ("dynamic", "bernoulli"), "cifar10": ("none", "logistic")}
    mnist, bmnist, omni, cifar = (D.SPECS[n] for n in D.DATASETS)
    assert all(s.url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for s in mnist.sources)
    assert len(mnist.sources) == 4 and len(bmnist.sources) == 3
    assert [s.filename for s in mnist.sources_for("valid")] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert [s.filename for s in bmnist.sources_for("valid")] == ["binarized_mnist_valid.amat"]
    for s in mnist.sources + bmnist.sources:
        assert len(s.sha256) == 64 and s.md5 is None
    assert [(s.sha256, s.md5) for s in cifar.sources] == [(None, "c58f30108f718f92721af3b95e74349a")]
    assert [(s.sha256, s.md5) for s in omni.sources] == [(None, None)]
    # split sizes the papers use
    assert {n: [s.split_size(x) for x in D.SPLITS] for n, s in D.SPECS.items()} == {
        "mnist": [50_000, 10_000, 10_000], "binarized-mnist": [50_000, 10_000, 10_000],
        "omniglot": [23_000, 1_345, 8_070], "cifar10": [45_000, 5_000, 10_000]}


def test_amat_gz_and_readonly_data_dir(tmp_path, monkeypatch):
    synthetic(monkeypatch, "binarized-mnist", valid=4)
    x = np.random.default_rng(1).integers(0, 2, (4, 784))
    folder = tmp_path / "data" / "binarized_mnist"
    write(folder / "binarized_mnist_valid.amat.gz", gzip.compress(amat_bytes(x)))
    folder.chmod(0o555)
    try:
        d = D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path / "data", download=False)
    finally:
        folder.chmod(0o755)
    assert np.array_equal(d.images.reshape(4, 784).numpy(), x)


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
    # binarized-mnist valid: sha256 of the file
    x = rng.integers(0, 2, (6, 784))
    body = write(served / "bm_valid.amat", amat_bytes(x)).read_bytes()
    patch_spec(monkeypatch, "binarized-mnist", urls={"binarized_mnist_valid.amat": base + "bm_valid.amat"},
               digests={"binarized_mnist_valid.amat": sha256(body)},
               file_sizes={"train": 50_000, "valid": 6, "test": 10_000})
    # mnist test: sha256 of the gunzipped content
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    write(served / "ti.gz", gzip.compress(idx_bytes(imgs)))
    write(served / "tl.gz", gzip.compress(idx_bytes(labels)))
    patch_spec(monkeypatch, "mnist",
               urls={"t10k-images-idx3-ubyte.gz": base + "ti.gz", "t10k-labels-idx1-ubyte.gz": base + "tl.gz"},
               digests={"t10k-images-idx3-ubyte.gz": sha256(idx_bytes(imgs)),
                        "t10k-labels-idx1-ubyte.gz": sha256(idx_bytes(labels))},
               file_sizes={"train": 60_000, "test": 20})
    data_dir = tmp_path / "data"
    d = D.load_dataset("binarized-mnist", "valid", data_dir=data_dir)
    landed = data_dir / "binarized_mnist" / "binarized_mnist_valid.amat"
    assert landed.read_bytes() == body
    assert np.array_equal(d.images.reshape(6, 784).numpy(), x)
    m = D.load_dataset("mnist", "test", data_dir=data_dir)
    assert np.array_equal(m.images[:, 0].numpy(), imgs) and m.labels.tolist() == labels.tolist()
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # no temp files left
    # A download is hashed once: loading it again neither hashes nor parses.
    monkeypatch.setattr(sources, "content_digest", lambda *a: pytest.fail("re-hashed a verified download"))
    assert np.array_equal(D.load_dataset("mnist", "test", data_dir=data_dir).images[:, 0].numpy(), imgs)
    monkeypatch.undo()
    # file:// URLs work too
    patch_spec(monkeypatch, "binarized-mnist", urls={"binarized_mnist_valid.amat": (served / "bm_valid.amat").as_uri()},
               digests={"binarized_mnist_valid.amat": sha256(body)},
               file_sizes={"train": 50_000, "valid": 6, "test": 10_000})
    D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path / "data2")
    assert (tmp_path / "data2" / "binarized_mnist" / "binarized_mnist_valid.amat").read_bytes() == body


@pytest.mark.parametrize("name, split, filename, kind", [
    ("binarized-mnist", "test", "binarized_mnist_test.amat", "its sha256"),
    ("mnist", "test", "t10k-images-idx3-ubyte.gz", "the sha256 of its uncompressed content"),
    ("cifar10", "test", "cifar-10-python.tar.gz", "its md5"),
])
def test_download_bad_checksum(http_root, tmp_path, monkeypatch, name, split, filename, kind):
    served, base = http_root
    write(served / "payload", gzip.compress(b"<html>not the dataset</html>"))
    expected = D.SPECS[name].sources_for(split)[0]
    expected = expected.md5 or expected.sha256
    patch_spec(monkeypatch, name, urls={s.filename: base + "payload" for s in D.SPECS[name].sources})
    with pytest.raises(HVAEError) as e:
        D.load_dataset(name, split, data_dir=tmp_path / "data")
    msg = one_line_error(e)
    assert filename in msg and f"{kind} is " in msg and expected in msg and "deleted" in msg
    assert not (tmp_path / "data").exists()  # nothing left behind, not even the folders


def test_download_omniglot_unparseable(http_root, tmp_path, monkeypatch):
    served, base = http_root
    write(served / "chardata.mat", b"404: Not Found")
    patch_spec(monkeypatch, "omniglot", urls={"chardata.mat": base + "chardata.mat"})
    (tmp_path / "data").mkdir()
    with pytest.raises(HVAEError) as e:
        D.load_dataset("omniglot", "train", data_dir=tmp_path / "data")
    msg = one_line_error(e)
    assert "chardata.mat" in msg and "no checksum" in msg and "not a readable MATLAB file" in msg
    assert msg.count("Fix:") == 1 and ".part" not in msg
    assert list((tmp_path / "data").iterdir()) == []  # the data dir was there before: it stays


def test_download_offline_and_disabled(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "binarized-mnist",
               urls={"binarized_mnist_train.amat": "http://127.0.0.1:9/binarized_mnist_train.amat"})
    data_dir = tmp_path / "data"
    with pytest.raises(HVAEError) as e:
        D.load_dataset("binarized-mnist", "train", data_dir=data_dir)
    msg = one_line_error(e)
    want = str((data_dir / "binarized_mnist" / "binarized_mnist_train.amat").absolute())
    assert want in msg and "--data-dir" in msg and "HVAE_DATA_DIR" in msg and "failed" in msg
    assert not data_dir.exists()  # the failed attempt left no empty folders behind
    # A folder that held something before stays.
    write(data_dir / "mnist" / "keep", b"")
    with pytest.raises(HVAEError):
        D.load_dataset("binarized-mnist", "train", data_dir=data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["mnist"]
    with pytest.raises(HVAEError) as e:
        D.load_dataset("cifar10", "train", data_dir=data_dir, download=False)
    msg = one_line_error(e)
    assert "cifar-10-python.tar.gz" in msg and "--data-dir" in msg and str(data_dir.absolute()) in msg


def test_the_wheel_ships_the_data_package():
    """A non-editable install ships only the packages pyproject.toml lists."""
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "hvae_fast.data" in cfg["packages"] and cfg["package-dir"]["hvae_fast.kernels"] == "kernels"
    assert (repo / cfg["package-dir"]["hvae_fast"] / "data" / "__init__.py").is_file()
