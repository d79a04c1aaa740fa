"""Source files: find them in the data dir, download the missing ones, and verify both.

The data dir is ``resolve_data_dir()``; each dataset's files sit in its record's ``folder``. A
source's content digest is the sha256 of its uncompressed content (a ``.gz`` file is gunzipped
first where the record's standard digest is of the uncompressed file). It is computed when a file
is first seen and again whenever its size or mtime change, checked against the record's standard
digest where one is published, and remembered in the cache, so a start-up with unchanged files
hashes nothing. Downloads land in a temp file, are checked (sha256 and md5 where published, else
by parsing), and only then take the file's name.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from hvae_fast import fsutil
from hvae_fast.errors import HVAEError

from . import cache, parsers
from .datasets import DatasetSpec, Source
from .parsers import one_line

_DOWNLOAD_TIMEOUT_S = 60


# The working directory when the package was imported: a relative HVAE_DATA_DIR (the README's
# ../shared/data) names a folder relative to where the program started, even after a chdir.
try:
    _START_DIR = os.getcwd()
except OSError:  # started in a deleted folder: relative settings are then taken as they come
    _START_DIR = None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir: ``data_dir``, else env ``HVAE_DATA_DIR`` (absolute; a relative one is taken
    from the directory the program started in), else ``user_cache_dir/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("HVAE_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        return Path(os.path.normpath(os.path.join(_START_DIR, path))) if _START_DIR is not None else path
    return cache.user_cache_root() / "data"


# --------------------------------------------------------------------------------------------
# Content digests and local verification
# --------------------------------------------------------------------------------------------


def _hash_file(path: Path, algo: str, gunzip: bool) -> str:
    h = hashlib.new(algo)
    with (gzip.open if gunzip else open)(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _gunzips(src: Source, path: Path) -> bool:
    """Whether ``src``'s digest is of what ``path`` gunzips to (a standard digest of the
    uncompressed file, and a .gz copy); files without a standard digest are hashed as they are."""
    return src.sha256 is not None and path.name.endswith(".gz")


def content_digest(src: Source, path: Path) -> str:
    """sha256 of ``path``'s content, as ``src.sha256`` defines it."""
    try:
        return _hash_file(path, "sha256", _gunzips(src, path))
    except parsers.READ_ERRORS as exc:
        raise parsers.read_error(path, exc) from None


def verify(src: Source, path: Path, *, trust_record: bool = True) -> str:
    """The content digest of local file ``path``, checked against ``src.sha256``. The digest is
    computed once per (size, mtime) of the file and remembered in the cache; with
    ``trust_record=False`` the file is hashed even so. A record that disagrees with the content
    (an edit that kept size and mtime, or a damaged or planted record) is replaced, with a warning."""
    recorded = cache.known_digest(path)
    digest = recorded if trust_record else None
    if digest is not None and src.sha256 is not None and digest != src.sha256:
        digest = None  # the record, not necessarily the file, may be wrong: hash before refusing
    if digest is None:
        digest = content_digest(src, path)
    if recorded is not None and digest != recorded:
        warnings.warn(f"{path}: the content digest on record for its size and mtime is not its "
                      "content's (an edit that kept both, or a damaged cache record); using the "
                      "content's", RuntimeWarning, stacklevel=2)
    if src.sha256 is not None and digest != src.sha256:
        what = "uncompressed content" if _gunzips(src, path) else "content"
        raise HVAEError(
            f"{path}: the sha256 of its {what} is {digest}, but the publisher's {src.filename} has "
            f"{src.sha256}: the file is damaged, truncated or altered. Fix: delete it and re-run "
            f"to download it again ({src.url}), or restore the publisher's file in its place"
        )
    if digest != recorded:
        cache.remember_digest(path, digest)
    return digest


# --------------------------------------------------------------------------------------------
# Finding and downloading
# --------------------------------------------------------------------------------------------


def _missing_message(spec: DatasetSpec, root: Path, src: Source, why: str) -> str:
    looked = " or ".join(os.path.abspath(root / c) for c in src.candidates)
    return (
        f"{spec.name}: source file {src.filename} is missing (looked for {looked}); {why}. Fix: "
        f"put the publisher's file ({src.url}) there, or pass --data-dir DIR (or set "
        f"HVAE_DATA_DIR) to a folder whose {spec.folder}/ holds it, or go online and re-run to "
        "download it"
    )


def locate(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None, download: bool) -> list[Path]:
    """The local paths of the source files of ``split``, downloading missing ones if allowed."""
    root = resolve_data_dir(data_dir) / spec.folder
    paths = []
    for src in spec.sources_for(split):
        found = next((root / c for c in src.candidates if (root / c).is_file()), None)
        if found is None:
            if not download:
                raise HVAEError(_missing_message(spec, root, src, "downloading is off (download=False)"))
            found = _download(spec, split, root, src)
        paths.append(found)
    return paths


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr)


def _fetch(url: str, out) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "hvae-fast"})
    with urllib.request.urlopen(req, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
        length = resp.headers.get("Content-Length") if resp.headers else None
        bar = _progress(int(length) if length and length.isdigit() else None, url.rsplit("/", 1)[-1])
        try:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


def _download(spec: DatasetSpec, split: str, root: Path, src: Source) -> Path:
    """Download ``src`` to a temp file in ``root``, verify it, then move it to its name. On any
    failure the temp file goes, and so do the folders this call created (when still empty)."""
    dest = root / src.filename
    created = [d for d in (root, *root.parents) if not d.exists()]
    digest = []

    def fetch(out):
        try:
            _fetch(src.url, out)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, EOFError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise HVAEError(_missing_message(
                spec, root, src, f"downloading it from {src.url} failed: {one_line(reason)}")) from None

    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            # fetched into a temporary file, checked, then renamed to its name
            fsutil.atomic_write(dest, fetch, check=lambda tmp: digest.append(_verify_download(spec, split, src,
                                                                                              tmp, dest)))
        except OSError as exc:  # the folder: creating it, the temporary file or the rename
            raise HVAEError(
                f"{spec.name}: source file {src.filename} is missing and cannot be downloaded into "
                f"{os.path.abspath(root)} ({one_line(exc)}). Fix: pass --data-dir DIR (or set "
                f"HVAE_DATA_DIR) to a writable folder, or put the publisher's file ({src.url}) at "
                f"{os.path.abspath(dest)}"
            ) from None
    except BaseException:
        for d in created:  # deepest first; a folder that is not empty stays
            try:
                d.rmdir()
            except OSError:
                break
        raise
    cache.remember_digest(dest, digest[0])
    return dest


def _verify_download(spec: DatasetSpec, split: str, src: Source, tmp: Path, dest: Path) -> str:
    """Check a fresh download and return its content digest; raise HVAEError (the caller deletes
    ``tmp``) if it is bad."""
    fix = (f"Fix: re-run to try again (the server may have sent an error page), or fetch the "
           f"file yourself, check it, and put it at {os.path.abspath(dest)}")
    for algo, want, of_content in (("sha256", src.sha256, _gunzips(src, dest)), ("md5", src.md5, False)):
        if want is None:
            continue
        try:
            actual = _hash_file(tmp, algo, of_content)
        except parsers.READ_ERRORS as exc:
            actual = f"unreadable ({one_line(exc)})"
        if actual != want:
            what = f"the {algo} of its uncompressed content" if of_content else f"its {algo}"
            raise HVAEError(
                f"downloaded {src.filename} from {src.url}, but {what} is {actual}, expected "
                f"{want}; the bad download was deleted. {fix}"
            )
    if src.sha256 is None and src.md5 is None:
        try:
            parsers.parse_files(spec, split, [tmp])
        except HVAEError as exc:
            problem = str(exc).split(". Fix:")[0].removeprefix(f"{tmp}: ")  # the parser's finding
            raise HVAEError(
                f"downloaded {src.filename} from {src.url}, but no checksum is published for it and "
                f"it does not parse as the {spec.name} file ({problem}); the bad download was "
                f"deleted. {fix}"
            ) from None
    return src.sha256 or _hash_file(tmp, "sha256", False)  # a checked sha256 is the digest

