"""The cache: source files' content digests and parsed splits, in ``resolve_cache_dir()``.

``digests/<hash of the source's absolute path>.json`` holds {size, mtime_ns, sha256} of a source
file whose content was hashed (and, where a standard digest is known, verified): a file whose size
and mtime are unchanged is not hashed again. Parsed splits are ``.npy`` files named
``<dataset>-<split>-<key>.<images|labels|indices>.npy``, where the key hashes the sources' content
digests, so a touched but unchanged file still hits and a changed one never does. Arrays are
memory-mapped copy-on-write on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

_CACHE_VERSION = 2
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


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        _atomic_write(target, lambda f: f.write(json.dumps(rec).encode()))
    except OSError as exc:
        _warn_unwritable(f"the digest of {path}", target.parent, exc)


# --------------------------------------------------------------------------------------------
# Parsed splits
# --------------------------------------------------------------------------------------------


def split_key(name: str, digests: list[str]) -> str:
    """The parse-cache key of a dataset's splits read from sources with these content digests."""
    return hashlib.sha256("\0".join([f"v{_CACHE_VERSION}", name, *digests]).encode()).hexdigest()[:20]


def _split_files(cache_dir: Path, name: str, split: str, key: str) -> dict[str, Path]:
    return {part: cache_dir / f"{name}-{split}-{key}.{part}.npy" for part in _PARTS}


def read_split(name: str, split: str, key: str) -> Split | None:
    """The cached (images, labels, indices) of a split, or None on a miss or a damaged entry."""
    files = _split_files(resolve_cache_dir(), name, split, key)
    if not files["images"].is_file():
        return None
    out = []
    try:
        for part in _PARTS:
            # Copy-on-write memory map: instant, pages are read on first use, arrays are writable.
            out.append(np.load(files[part], mmap_mode="c", allow_pickle=False)
                       if files[part].is_file() else None)
    except (OSError, ValueError, EOFError):
        return None  # a damaged cache file: re-parse and rewrite it
    images, labels, indices = out
    n = images.shape[0]
    if any(a is not None and a.shape[:1] != (n,) for a in (labels, indices)):
        return None
    return images, labels, indices


def write_split(name: str, split: str, key: str, arrays: Split) -> None:
    """Cache one split, replacing older entries of it; warns (once per call) if it cannot."""
    cache_dir = resolve_cache_dir()
    files = _split_files(cache_dir, name, split, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Stale entries of this split (an older source file) go first.
        for old in cache_dir.glob(f"{name}-{split}-*.npy"):
            if old not in files.values():
                old.unlink(missing_ok=True)
        # images last: read_split treats a split whose images file exists as complete.
        for part, arr in zip(("labels", "indices", "images"), (arrays[1], arrays[2], arrays[0])):
            if arr is not None:
                _atomic_write(files[part], lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))
            else:
                files[part].unlink(missing_ok=True)
    except OSError as exc:
        _warn_unwritable(f"the parsed {name} {split} split", cache_dir, exc)
