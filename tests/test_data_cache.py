"""hvae_fast.data.cache: parse once, re-parse when the content changes, hash each source file once
per (size, mtime), and keep working (with a warning) when the cache dir is unwritable."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hvae_fast import data as D
from hvae_fast.data import parsers, sources

from datatools import (SHARED, amat_bytes, cache_files, isolated_env, patch_spec, real, sha256,  # noqa: F401
                       synthetic, write)


def bump_mtime(path, seconds=5):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_mnist_valid_deterministic_and_cached(real, monkeypatch, tmp_path):
    first = real("mnist", "valid")
    assert cache_files("mnist-valid-*.images.npy") and cache_files("mnist-train-*.images.npy")
    # A second load reads only the cache: the parser must not run.
    monkeypatch.setattr(parsers, "parse_idx", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    again = real("mnist", "valid")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    monkeypatch.undo()
    # A fresh parse (empty cache) gives the same validation split.
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = D.load_dataset("mnist", "valid", data_dir=SHARED, download=False)
    assert torch.equal(first.images, fresh.images) and torch.equal(first.indices, fresh.indices)



def test_amat_cache_invalidated_when_source_changes(tmp_path, monkeypatch):
    synthetic(monkeypatch, "binarized-mnist", test=3)
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
    bump_mtime(src)
    d2 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert np.array_equal(d2.images.reshape(3, 784).numpy(), x2)
    # different size -> re-parsed; the stale cache entries are gone
    synthetic(monkeypatch, "binarized-mnist", test=5)
    x3 = rng.integers(0, 2, (5, 784))
    write(src, amat_bytes(x3, eol="\r\n"))
    d3 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert np.array_equal(d3.images.reshape(5, 784).numpy(), x3)
    now = cache_files("binarized-mnist-test-*.npy")
    assert len(now) == 1 and now != first_cache
    # unchanged source -> cache hit
    monkeypatch.setattr(parsers, "parse_amat", lambda *a, **k: pytest.fail("re-parsed a cached split"))
    d4 = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path / "data", download=False)
    assert cache_files("binarized-mnist-test-*.npy") == now and torch.equal(d3.images, d4.images)


def test_sources_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    """A source is hashed when first seen and again only when its size or mtime change; the parse
    is keyed on the content digest, so a touched but unchanged file is not parsed again."""
    x = np.random.default_rng(0).integers(0, 2, (4, 784))
    body = amat_bytes(x)
    patch_spec(monkeypatch, "binarized-mnist", digests={"binarized_mnist_valid.amat": sha256(body)},
               file_sizes={"train": 50_000, "valid": 4, "test": 10_000})
    src = write(tmp_path / "binarized_mnist" / "binarized_mnist_valid.amat", body)
    calls = []
    real_digest = sources.content_digest
    monkeypatch.setattr(sources, "content_digest", lambda *a: calls.append(a[1]) or real_digest(*a))
    load = lambda: D.load_dataset("binarized-mnist", "valid", data_dir=tmp_path, download=False)  # noqa: E731
    assert np.array_equal(load().images.reshape(4, 784).numpy(), x) and calls == [src]
    monkeypatch.setattr(parsers, "parse_amat", lambda *a, **k: pytest.fail("re-parsed unchanged content"))
    load()
    assert calls == [src]  # unchanged: neither hashed nor parsed
    bump_mtime(src)
    assert np.array_equal(load().images.reshape(4, 784).numpy(), x)
    assert calls == [src, src]  # touched: hashed again, same digest, still no parse


def test_unwritable_cache_warns_and_loads(tmp_path, monkeypatch):
    synthetic(monkeypatch, "binarized-mnist", test=2)
    x = np.random.default_rng(0).integers(0, 2, (2, 784))
    write(tmp_path / "binarized_mnist" / "binarized_mnist_test.amat", amat_bytes(x))
    monkeypatch.setenv("HVAE_CACHE_DIR", str(write(tmp_path / "a-file", b"")))  # not a folder
    with pytest.warns(RuntimeWarning, match="HVAE_CACHE_DIR"):
        d = D.load_dataset("binarized-mnist", "test", data_dir=tmp_path, download=False)
    assert np.array_equal(d.images.reshape(2, 784).numpy(), x)
