"""The cache: source files' content digests and parsed splits, in ``resolve_cache_dir()``.

``digests/<hash of the source's absolute path>.json`` holds {size, mtime_ns, sha256} of a source
file whose content was hashed (and, where a standard digest is known, verified): a file whose size
and mtime are unchanged is not hashed again. Parsed splits are ``.npy`` files named
``<dataset>-<split>-<key>.<images|labels|indices>.npy``, where the key hashes the sources' content
digests, so a touched but unchanged file still hits and a changed one never does. Next to them,
``<dataset>-<split>-<key>.json`` (written last) records the sources' digests and each array's
sha256, dtype and shape; a split is read only when all of them match, else it is re-parsed with a
warning. Arrays are memory-mapped copy-on-write on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write

_CACHE_VERSION = 2  # of the digest records
_SPLIT_VERSION = 3  # of the parsed splits: 3 added the per-split record of digests
_PARTS = ("images", "labels", "indices")
Split = tuple  # (images np.ndarray, labels np.ndarray | None, indices np.ndarray | None)


def user_cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("hvae-fast"))


def resolve_cache_dir() -> Path:
    """Where digests and parsed splits are cached: env ``HVAE_CACHE_DIR``, else
    ``user_cache_dir("hvae-fast")/parsed``."""
    env = os.environ.get("HVAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "parsed"


def _warn_unwritable(what: str, cache_dir: Path, exc: OSError) -> None:
    warnings.warn(
        f"could not cache {what} in {cache_dir} ({' '.join(str(exc).split())}); loading will redo "
        "that work each time. Set HVAE_CACHE_DIR to a writable folder.",
        RuntimeWarning,
        stacklevel=4,
    )


# --------------------------------------------------------------------------------------------
# Content digests, remembered by (size, mtime)
# --------------------------------------------------------------------------------------------


def _digest_file(path: Path) -> Path:
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24]
    return resolve_cache_dir() / "digests" / f"{key}.json"


def known_digest(path: Path) -> str | None:
    """The content digest recorded for ``path`` at its current size and mtime, or None."""
    st = path.stat()
    try:
        rec = json.loads(_digest_file(path).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("v") == _CACHE_VERSION and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return rec.get("sha256")
    return None


def remember_digest(path: Path, digest: str) -> None:
    """Record ``digest`` as the content digest of ``path`` at its current size and mtime."""
    st = path.stat()
    rec = {"v": _CACHE_VERSION, "path": os.path.abspath(path), "size": st.st_size,
           "mtime_ns": st.st_mtime_ns, "sha256": digest}
    target = _digest_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda f: f.write(json.dumps(rec).encode()))
    except OSError as exc:
        _warn_unwritable(f"the digest of {path}", target.parent, exc)


# --------------------------------------------------------------------------------------------
# Parsed splits
# --------------------------------------------------------------------------------------------


def split_key(name: str, digests: list[str]) -> str:
    """The parse-cache key of a dataset's splits read from sources with these content digests."""
    return hashlib.sha256("\0".join([f"v{_SPLIT_VERSION}", name, *digests]).encode()).hexdigest()[:20]


def _split_files(cache_dir: Path, name: str, split: str, key: str) -> dict[str, Path]:
    return {part: cache_dir / f"{name}-{split}-{key}.{part}.npy" for part in _PARTS}


def _record_file(cache_dir: Path, name: str, split: str, key: str) -> Path:
    return cache_dir / f"{name}-{split}-{key}.json"


def _array_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def _describe(arr: np.ndarray) -> dict:
    return {"sha256": _array_digest(arr), "dtype": arr.dtype.str, "shape": list(arr.shape)}


def _warn_bad_entry(name: str, split: str, problem: str) -> None:
    warnings.warn(f"the cached {name} {split} split is not what was parsed ({problem}); parsing the "
                  "source files again", RuntimeWarning, stacklevel=3)


def read_split(name: str, split: str, key: str, source_digests: list[str]) -> Split | None:
    """The cached (images, labels, indices) of a split parsed from sources with ``source_digests``,
    or None on a miss. An entry whose record, sources or array digests, dtypes or shapes do not
    match is a miss too, with a warning (the caller re-parses and rewrites it)."""
    cache_dir = resolve_cache_dir()
    files = _split_files(cache_dir, name, split, key)
    record_file = _record_file(cache_dir, name, split, key)
    if not record_file.exists() and not any(f.exists() for f in files.values()):
        return None  # a plain miss
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        parts, sources = record.get("parts"), record.get("sources")
    except (OSError, ValueError, RecursionError) as exc:
        _warn_bad_entry(name, split, f"{record_file.name} is unreadable: {' '.join(str(exc).split())}")
        return None
    if record.get("v") != _SPLIT_VERSION or sources != list(source_digests):
        _warn_bad_entry(name, split, f"{record_file.name} is of other source files or another version")
        return None
    if not isinstance(parts, dict) or "images" not in parts or not set(parts) <= set(_PARTS):
        _warn_bad_entry(name, split, f"{record_file.name} does not list the arrays")
        return None
    out = []
    for part in _PARTS:
        if part not in parts:
            out.append(None)
            continue
        try:
            # Copy-on-write memory map: pages are read on first use (here, by the digest), and the
            # arrays are writable.
            arr = np.load(files[part], mmap_mode="c", allow_pickle=False)
            found = _describe(arr)
        except (OSError, ValueError, EOFError) as exc:
            _warn_bad_entry(name, split, f"{files[part].name} is unreadable: {' '.join(str(exc).split())}")
            return None
        if found != parts[part]:
            _warn_bad_entry(name, split, f"{files[part].name} holds {found['dtype']}{found['shape']} with "
                            "another sha256 than its record")
            return None
        out.append(arr)
    images, labels, indices = out
    n = images.shape[0]
    if any(a is not None and a.shape[:1] != (n,) for a in (labels, indices)):
        _warn_bad_entry(name, split, "its arrays hold different numbers of rows")
        return None
    return images, labels, indices


def write_split(name: str, split: str, key: str, arrays: Split, source_digests: list[str]) -> None:
    """Cache one split parsed from sources with ``source_digests``, replacing older entries of it;
    warns (once per call) if it cannot."""
    cache_dir = resolve_cache_dir()
    files = _split_files(cache_dir, name, split, key)
    record_file = _record_file(cache_dir, name, split, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Stale entries of this split (an older source file, or this one's, rewritten) go first.
        for old in [*cache_dir.glob(f"{name}-{split}-*.npy"), *cache_dir.glob(f"{name}-{split}-*.json")]:
            old.unlink(missing_ok=True)
        parts = {}
        for part, arr in zip(_PARTS, arrays):
            if arr is not None:
                arr = np.ascontiguousarray(arr)
                atomic_write(files[part], lambda f, a=arr: np.save(f, a, allow_pickle=False))
                parts[part] = _describe(arr)
        # The record last: read_split reads only an entry whose record exists.
        record = {"v": _SPLIT_VERSION, "sources": list(source_digests), "parts": parts}
        atomic_write(record_file, lambda f: f.write(json.dumps(record).encode()))
    except OSError as exc:
        _warn_unwritable(f"the parsed {name} {split} split", cache_dir, exc)
