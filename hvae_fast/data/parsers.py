"""Format parsers: the publishers' files -> numpy arrays, with every structural check on the way.

Returned arrays: images uint8 [N, 1, 28, 28] (IDX: 0..255; .amat: 0/1), uint8 [N, 3, 32, 32]
(CIFAR-10, channels R, G, B), or float32 [N, 1, 28, 28] grey levels in [0, 1] (chardata.mat);
labels int64 [N] in 0..9, or None. ``parse_files`` checks the image and label counts and, where the
record gives them, the class counts, against the dataset's record. Every malformed input raises one
``HVAEError`` naming the file, what is wrong, and the fix.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from hvae_fast.errors import HVAEError

from .datasets import DatasetSpec, url_of

Arrays = tuple  # (images np.ndarray, labels np.ndarray | None)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def corrupt(path: Path, problem: str, expected: str) -> HVAEError:
    """The error for a damaged source file: what is wrong, what was expected, and the fix."""
    url = url_of(path.name)
    where = f" ({url})" if url else ""
    return HVAEError(
        f"{path}: {problem}; expected {expected}. Fix: delete it and re-run to download it again, "
        f"or replace it with the publisher's file{where}"
    )


READ_ERRORS = (OSError, EOFError, zlib.error)


def read_error(path: Path, exc: BaseException) -> HVAEError:
    """The error for a ``READ_ERRORS`` exception raised while reading (or gunzipping) ``path``."""
    if path.name.endswith(".gz") and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return corrupt(path, f"not a valid gzip file or truncated ({one_line(exc)})",
                       "a complete gzip-compressed file")
    return HVAEError(f"cannot read {path}: {one_line(exc)}. Fix: check the file's permissions, "
                     "or pass --data-dir to a folder you can read")


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if its name ends in .gz."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None


def parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX uint8 array file (magic 0x0000080N) with ``ndim`` dimensions."""
    raw = read_bytes(path)
    want_magic = 0x0800 | ndim
    kind = "IDX image file" if ndim == 3 else "IDX label file"
    if len(raw) < 4:
        raise corrupt(path, f"only {len(raw)} bytes", f"an {kind} (magic number 0x{want_magic:08x})")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != want_magic:
        raise corrupt(path, f"bad magic number 0x{magic:08x}",
                       f"0x{want_magic:08x} (an {kind} of unsigned bytes)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(path, f"truncated header ({len(raw)} bytes)", f"a {header}-byte header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != want:
        raise corrupt(path, f"{len(raw)} bytes (wrong size, truncated?)",
                       f"{want} bytes for an array of shape {tuple(dims)}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise corrupt(path, f"images of shape {tuple(dims[1:])}", "28x28 MNIST images")
    if ndim == 1 and arr.size and int(arr.max()) > 9:
        raise corrupt(path, f"a label {int(arr.max())}", "labels 0..9")
    return arr


def parse_amat(path: Path) -> np.ndarray:
    """A Larochelle binarized-MNIST .amat (or .amat.gz): one image a line, 784 '0'/'1' values
    separated by spaces. Parsed on raw bytes with numpy (a 78 MB file takes well under a second)."""
    raw = read_bytes(path)
    b = np.frombuffer(raw, dtype=np.uint8)
    # Fast path, the publisher's exact layout: "v v ... v\n", 1,568 bytes a line.
    if b.size and b.size % 1568 == 0:
        lines = b.reshape(-1, 1568)
        seps = lines[:, 1::2]
        if (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all():
            vals = lines[:, 0::2] - np.uint8(ord("0"))
            if (vals <= 1).all():
                return np.ascontiguousarray(vals).reshape(-1, 1, 28, 28)
    # General path: any whitespace layout (\r\n line ends, repeated or trailing spaces).
    keep = (b != ord(" ")) & (b != ord("\n")) & (b != ord("\r")) & (b != ord("\t"))
    vals = b[keep] - np.uint8(ord("0"))  # uint8 wrap: anything other than '0'/'1' becomes > 1
    bad = np.flatnonzero(vals > 1)
    if bad.size:
        ch = bytes([int(vals[bad[0]] + ord("0")) & 0xFF])
        raise corrupt(path, f"a value {ch!r} (value number {int(bad[0])})",
                       "only the values 0 and 1 separated by spaces")
    n_lines = sum(1 for line in raw.split(b"\n") if line.strip())
    if vals.size == 0 or vals.size % 784 or vals.size // 784 != n_lines:
        raise corrupt(path, f"{vals.size} values on {n_lines} lines",
                       "784 values on every line (28x28 binary images)")
    return vals.reshape(-1, 1, 28, 28)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing that could
    run code: only the numpy array reconstructors and ``_codecs.encode`` are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name}")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            alt = module.replace("numpy._core", "numpy.core") if "_core" in module else \
                module.replace("numpy.core", "numpy._core")
            return super().find_class(alt, name)


CIFAR_MEMBERS = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)) + (
    "cifar-10-batches-py/test_batch",
)


def parse_cifar_tar(path: Path, sizes: dict[str, int]) -> dict[str, Arrays]:
    """The CIFAR-10 python-version tarball -> {"train": (x [N,3,32,32], y [N]), "test": (...)},
    reading only b"data" and b"labels". Each of the five training batches must hold
    sizes["train"] / 5 images and the test batch sizes["test"]. Streams the tarball once (no
    random access into the gzip stream)."""
    import tarfile

    rows = {m: sizes["train"] // 5 for m in CIFAR_MEMBERS[:5]} | {CIFAR_MEMBERS[5]: sizes["test"]}
    found: dict[str, Arrays] = {}
    member = "?"
    try:
        with tarfile.open(path, "r|*", bufsize=1 << 20) as tar:
            for info in tar:
                if info.name not in CIFAR_MEMBERS or not info.isfile():
                    continue
                member = info.name
                f = tar.extractfile(info)
                assert f is not None
                batch = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
                if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                    raise corrupt(path, f"member {member} holds {keys}",
                                  'a dict with b"data" and b"labels"')
                data = np.asarray(batch[b"data"])
                labels = np.asarray(batch[b"labels"])
                if data.dtype != np.uint8 or data.shape != (rows[member], 3072) \
                        or labels.shape != (rows[member],) or not np.issubdtype(labels.dtype, np.integer):
                    raise corrupt(path, f"member {member} has data {data.dtype}{list(data.shape)} "
                                  f"and {labels.dtype} labels{list(labels.shape)}",
                                  f"uint8 data of shape [{rows[member]}, 3072] with {rows[member]} integer labels")
                found[member] = (data, labels.astype(np.int64))
    except HVAEError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise corrupt(path, f"not a readable tar.gz archive ({one_line(exc)})",
                      "the CIFAR-10 python-version tarball") from None
    except Exception as exc:  # pickle errors and whatever a damaged pickle stream raises
        raise corrupt(path, f"member {member} is not a readable CIFAR batch pickle "
                      f"({type(exc).__name__}: {one_line(exc)})",
                      'pickled dicts with b"data" and b"labels"') from None
    missing = [m for m in CIFAR_MEMBERS if m not in found]
    if missing:
        raise corrupt(path, f"missing member(s) {', '.join(missing)}",
                      f"members {', '.join(CIFAR_MEMBERS)}")
    train = [found[m] for m in CIFAR_MEMBERS[:5]]
    x_train = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = found[CIFAR_MEMBERS[5]]
    return {"train": (x_train, y_train), "test": (x_test.reshape(-1, 3, 32, 32), y_test)}


def parse_chardata(path: Path) -> dict[str, Arrays]:
    """IWAE's chardata.mat -> {"train": (float32 [N,1,28,28], None), "test": ...}, row-major images."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["data", "testdata"], appendmat=False)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, ... on bad files
        raise corrupt(path, f"not a readable MATLAB file ({type(exc).__name__}: {one_line(exc)})",
                      "IWAE's chardata.mat (a MATLAB v5 file)") from None
    out = {}
    for key, split in (("data", "train"), ("testdata", "test")):
        if key not in mat:
            raise corrupt(path, f"no variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})",
                          "variables 'data' and 'testdata' (784 x N grey levels)")
        m = np.asarray(mat[key])
        if m.ndim != 2 or m.shape[0] != 784 or not (np.issubdtype(m.dtype, np.floating)
                                                    or np.issubdtype(m.dtype, np.integer)):
            raise corrupt(path, f"{key!r} of shape {list(m.shape)} and dtype {m.dtype}",
                          f"{key!r} a 784 x N real array")
        m = m.astype(np.float32)
        if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 1):
            raise corrupt(path, f"{key!r} has values outside [0, 1]", "grey levels in [0, 1]")
        # Each column is a column-major 28x28 image: transpose to row-major.
        x = m.T.reshape(-1, 28, 28).transpose(0, 2, 1)
        out[split] = (np.ascontiguousarray(x).reshape(-1, 1, 28, 28), None)
    return out


def parse_files(spec: DatasetSpec, split: str, paths: list[Path]) -> dict[str, Arrays]:
    """Parse the files ``spec.sources_for(split)`` found at ``paths`` -> {file split: (images,
    labels)}: every split those files hold (CIFAR's tarball and chardata.mat hold train and test),
    each checked against the record's image count and shape, label range and class counts."""
    file_split = spec.file_split(split)
    if spec.format == "idx":
        x = parse_idx(paths[0], 3).reshape(-1, 1, 28, 28)
        y = parse_idx(paths[1], 1).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise HVAEError(
                f"{paths[0]} holds {x.shape[0]} images but {paths[1]} holds {y.shape[0]} labels; "
                "expected equal counts. Fix: delete both and re-run to download them again, or "
                "replace them with the publisher's files")
        out = {file_split: (x, y)}
    elif spec.format == "amat":
        out = {file_split: (parse_amat(paths[0]), None)}
    elif spec.format == "cifar-python":
        out = parse_cifar_tar(paths[0], spec.file_sizes)
    elif spec.format == "iwae-mat":
        out = parse_chardata(paths[0])
    else:
        raise ValueError(f"no parser for format {spec.format!r}")
    for s, (x, y) in out.items():
        _check_structure(spec, s, paths[0], x, y)
    return out


def _check_structure(spec: DatasetSpec, file_split: str, path: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    want = spec.file_sizes[file_split]
    what = f"the {spec.name} {file_split} set"
    if x.shape[0] != want or tuple(x.shape[1:]) != spec.image_shape:
        raise corrupt(path, f"{x.shape[0]} images of shape {list(x.shape[1:])} for {what}",
                      f"{want} images of shape {list(spec.image_shape)}")
    if y is not None and y.size and (y.min() < 0 or y.max() > 9):
        raise corrupt(path, f"{what} has labels in {int(y.min())}..{int(y.max())}", "labels 0..9")
    counts = (spec.class_counts or {}).get(file_split)
    if counts is not None and y is not None:
        got = np.bincount(y, minlength=len(counts))
        if len(got) != len(counts) or not np.array_equal(got, counts):
            raise corrupt(path, f"{what} has images per class {got.tolist()}",
                          f"{list(counts)} (the published class balance)")
