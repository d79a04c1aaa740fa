"""Datasets: the one place that finds, downloads, verifies, parses, caches and batches them.

Public API
----------
``DATASETS``                       the dataset names ``load_dataset`` knows.
``SOURCES``                        dataset -> [(filename, url, checksum_kind, checksum)], the
                                   publishers' files.
``resolve_data_dir(data_dir)``     argument, else env ``HVAE_DATA_DIR``, else
                                   ``user_cache_dir("hvae-fast")/data``; one subfolder a dataset
                                   (``mnist/``, ``binarized_mnist/``, ``omniglot/``, ``cifar10/``).
``resolve_cache_dir()``            env ``HVAE_CACHE_DIR``, else ``user_cache_dir("hvae-fast")/parsed``:
                                   parsed splits as ``.npy``, keyed by source name + size + mtime_ns.
``load_dataset(name, split, data_dir=None, download=True) -> ImageDataset``
``ImageDataset``                   images (uint8 [N,C,H,W], or float32 in [0,1] for omniglot),
                                   labels (int64 [N] or None), binarize ("dynamic" | "static" |
                                   "none"), ``image_shape``, ``likelihood``.
``to_model_input(images, binarize, generator)``  uint8/float images -> float32 model input.
``BatchStream(dataset, batch_size, seed, ...)``  endless, resumable stream of training batches.
``eval_batches(dataset, batch_size, seed=0)``    finite, unshuffled, fixed-draw evaluation batches.
``split_indices(n, n_valid, seed)``              the train/valid index construction.

Splits
------
* ``mnist``: 60k IDX training set -> 50,000 train / 10,000 valid (``split_indices(60000, 10000,
  seed=0)``), the 10k test set; dynamically binarised with p = pixel / 255; labels kept.
* ``binarized-mnist``: Larochelle & Murray's static ``.amat`` files (``.amat`` or ``.amat.gz``),
  50k / 10k / 10k, already 0/1.
* ``omniglot``: the IWAE ``chardata.mat`` (keys ``data``, ``testdata``; 784 x N, column-major
  images, grey levels in [0, 1]); 1,345 training images held out for validation with
  ``np.random.RandomState(123)``; dynamically binarised.
* ``cifar10``: the python-version tarball, only ``b"data"`` and ``b"labels"``; 45,000 train /
  5,000 valid (``split_indices(50000, 5000, seed=0)``) / 10k test; scaled to [-1, 1].

Every user-facing failure is an ``HVAEError`` whose one-line message names the file, the problem
and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from hvae_fast.errors import HVAEError

__all__ = [
    "DATASETS",
    "SPLITS",
    "SOURCES",
    "ImageDataset",
    "BatchStream",
    "eval_batches",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_dir",
    "split_indices",
    "to_model_input",
]

DATASETS = ("mnist", "binarized-mnist", "omniglot", "cifar10")
SPLITS = ("train", "valid", "test")
BINARIZE_MODES = ("dynamic", "static", "none")

# Folder of each dataset inside the data dir (same names as the offline copies).
SUBDIRS = {
    "mnist": "mnist",
    "binarized-mnist": "binarized_mnist",
    "omniglot": "omniglot",
    "cifar10": "cifar10",
}
# Per-example shape (C, H, W) of each dataset's model input, known without reading any file.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "binarized-mnist": (1, 28, 28), "omniglot": (1, 28, 28), "cifar10": (3, 32, 32)}


def image_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of dataset ``name``."""
    if name not in IMAGE_SHAPES:
        raise HVAEError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return IMAGE_SHAPES[name]


_BINARIZE = {"mnist": "dynamic", "binarized-mnist": "static", "omniglot": "dynamic", "cifar10": "none"}

# (n_valid, seed) of the validation split carved out of each training set.
_VALID_SPLIT = {"mnist": (10_000, 0), "cifar10": (5_000, 0), "omniglot": (1_345, 123)}

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

# dataset -> [(filename, url, checksum_kind, checksum)]. checksum kinds:
#   "sha256-gunzip": sha256 of the gunzipped content (the publisher's .gz bytes may be re-compressed)
#   "sha256": sha256 of the file;  "md5": md5 of the file;  None: no published checksum.
# Checksums are verified on files this module downloads; files a user put in place are checked by
# the parsers (structure, sizes, value ranges) instead.
SOURCES: dict[str, list[tuple[str, str, str | None, str | None]]] = {
    "mnist": [
        ("train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz", "sha256-gunzip",
         "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        ("train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz", "sha256-gunzip",
         "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        ("t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz", "sha256-gunzip",
         "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        ("t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz", "sha256-gunzip",
         "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ],
    "binarized-mnist": [
        ("binarized_mnist_train.amat", _BMNIST_URL + "binarized_mnist_train.amat", "sha256",
         "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
        ("binarized_mnist_valid.amat", _BMNIST_URL + "binarized_mnist_valid.amat", "sha256",
         "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
        ("binarized_mnist_test.amat", _BMNIST_URL + "binarized_mnist_test.amat", "sha256",
         "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
    ],
    # The IWAE authors publish no checksum for chardata.mat: a download is checked by loading it
    # (a MATLAB file with 784-row float arrays ``data`` and ``testdata`` in [0, 1]).
    "omniglot": [
        ("chardata.mat",
         "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat",
         None, None),
    ],
    "cifar10": [
        ("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5",
         "c58f30108f718f92721af3b95e74349a"),
    ],
}

_CIFAR_MEMBERS = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)) + (
    "cifar-10-batches-py/test_batch",
)
_CACHE_VERSION = 1
_DOWNLOAD_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def _user_cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("hvae-fast"))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir: ``data_dir``, else env ``HVAE_DATA_DIR``, else ``user_cache_dir/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("HVAE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return _user_cache_root() / "data"


def resolve_cache_dir() -> Path:
    """Where parsed splits are cached: env ``HVAE_CACHE_DIR``, else ``user_cache_dir/parsed``."""
    env = os.environ.get("HVAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return _user_cache_root() / "parsed"


# --------------------------------------------------------------------------------------------
# The dataset object and model input
# --------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class ImageDataset:
    """One split of one dataset, held in memory.

    ``images``: uint8 [N, C, H, W] (mnist: 0..255; binarized-mnist: 0/1; cifar10: 0..255), or
    float32 [N, 1, 28, 28] in [0, 1] (omniglot). ``labels``: int64 [N] or None. ``binarize``: how
    ``to_model_input`` turns images into model input. ``indices``: for train/valid splits carved
    out of a training file, each image's index in that file (int64 [N]); None otherwise.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor | None
    binarize: str
    indices: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def likelihood(self) -> str:
        """The decoder likelihood this data calls for: "bernoulli" (binary) or "logistic"."""
        return "logistic" if self.binarize == "none" else "bernoulli"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, dtype={self.images.dtype}, "
            f"binarize={self.binarize!r}, labels={'yes' if self.labels is not None else 'no'})"
        )


def to_model_input(
    images: torch.Tensor, binarize: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Turn stored images into a float32 model input.

    ``"dynamic"``: a Bernoulli(p) draw, p = pixel / 255 for uint8 (the value itself for float
    images), from ``generator`` (uniform u < p, so p = 0 never and p = 1 always gives 1);
    ``"static"``: the 0/1 values as float; ``"none"``: uint8 0..255 scaled to [-1, 1] as x/127.5 - 1.
    """
    if binarize == "dynamic":
        p = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        dev = generator.device if generator is not None else p.device
        u = torch.rand(p.shape, generator=generator, device=dev).to(p.device)
        return (u < p).float()
    if binarize == "static":
        return images.float()
    if binarize == "none":
        return images.float() / 127.5 - 1.0
    raise HVAEError(
        f"unknown binarize mode {binarize!r}: use one of {', '.join(BINARIZE_MODES)}"
    )


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_derive_seed(*parts))
    return g


def _check_batch_size(dataset: ImageDataset, batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise HVAEError(f"batch size must be a positive integer, got {batch_size!r}: pass e.g. --batch-size 100")
    if batch_size > len(dataset):
        raise HVAEError(
            f"batch size {batch_size} is larger than the {dataset.name} {dataset.split} split "
            f"({len(dataset)} images): use a batch size of at most {len(dataset)}"
        )
    return int(batch_size)


class BatchStream:
    """An endless, deterministic, resumable iterator of model-input training batches.

    Epoch ``e`` visits the images in the order of a permutation drawn from a generator seeded by
    (seed, e) (``arange`` when ``shuffle=False``); batch ``p`` of epoch ``e`` is binarised with a
    generator seeded by (seed, e, p). The state is therefore just the counters ``epoch`` and
    ``position`` (the next batch's index in its epoch): a stream restored with
    ``load_state_dict`` yields exactly the batches an uninterrupted stream would have.
    ``drop_last=False`` ends each epoch with a partial batch.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.dataset = dataset
        self.batch_size = _check_batch_size(dataset, batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise HVAEError(f"BatchStream seed must be an integer, got {seed!r}: pass e.g. --seed 0")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        n = len(dataset)
        self.batches_per_epoch = n // self.batch_size if drop_last else math.ceil(n / self.batch_size)
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._order = torch.randperm(n, generator=_generator("epoch", self.seed, epoch))
            else:
                self._order = torch.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> torch.Tensor:
        order = self._epoch_order(self.epoch)
        start = self.position * self.batch_size
        idx = order[start : start + self.batch_size]
        g = _generator("batch", self.seed, self.epoch, self.position)
        x = to_model_input(self.dataset.images[idx], self.dataset.binarize, g)
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return x

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_images": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HVAEError(
                f"batch-stream state {state!r} lacks integer 'epoch' and 'position' ({exc}): "
                "resume from a checkpoint written by this version of hvae-fast"
            ) from None
        for key, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("shuffle", self.shuffle),
            ("drop_last", self.drop_last),
            ("num_images", len(self.dataset)),
        ):
            if key in state and state[key] != mine:
                raise HVAEError(
                    f"cannot resume the batch stream: the checkpoint has {key}={state[key]!r} but "
                    f"this run has {key}={mine!r}; resume with the same data, seed and batch size "
                    "as the checkpointed run"
                )
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise HVAEError(
                f"batch-stream state epoch={epoch}, position={position} is out of range "
                f"({self.batches_per_epoch} batches an epoch): the checkpoint does not match this data"
            )
        self.epoch, self.position = epoch, position


def eval_batches(dataset: ImageDataset, batch_size: int, seed: int = 0, limit: int = 0) -> Iterator[torch.Tensor]:
    """Model-input batches over ``dataset`` (its first ``limit`` examples if limit > 0) in order,
    the last one partial; binarisation draws are fixed by (seed, batch index), so two evaluations
    with the same seed see the same inputs."""
    n = min(limit, len(dataset)) if limit > 0 else len(dataset)
    bs = min(_check_batch_size(dataset, batch_size), n)

    def _gen() -> Iterator[torch.Tensor]:
        for i, start in enumerate(range(0, n, bs)):
            g = _generator("eval", int(seed), i)
            yield to_model_input(dataset.images[start : min(start + bs, n)], dataset.binarize, g)

    return _gen()


def split_indices(n: int, n_valid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices into a training file of ``n`` images: ``valid`` is the first
    ``n_valid`` entries of ``np.random.RandomState(seed).permutation(n)``, ``train`` the rest;
    both sorted."""
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _url_of(path: Path) -> str | None:
    for entries in SOURCES.values():
        for filename, url, _, _ in entries:
            if path.name in _candidates(filename):
                return url
    return None


def _corrupt(path: Path, problem: str, expected: str) -> HVAEError:
    url = _url_of(path)
    where = f" ({url})" if url else ""
    return HVAEError(
        f"{path}: {problem}; expected {expected}. Fix: delete it and re-run to download it again, "
        f"or replace it with the publisher's file{where}"
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Finding and downloading source files
# --------------------------------------------------------------------------------------------


def _candidates(filename: str) -> list[str]:
    """File names accepted for a source file: .amat also as .amat.gz, -ubyte.gz also unzipped."""
    if filename.endswith(".amat"):
        return [filename, filename + ".gz"]
    if filename.endswith("-ubyte.gz"):
        return [filename, filename[:-3]]
    return [filename]


def _needed_sources(name: str, split: str) -> list[tuple[str, str, str | None, str | None]]:
    entries = SOURCES[name]
    if name == "mnist":
        return entries[:2] if split in ("train", "valid") else entries[2:]
    if name == "binarized-mnist":
        return [e for e in entries if e[0].endswith(f"_{split}.amat")]
    return list(entries)


def _missing_message(name: str, root: Path, filename: str, url: str, why: str) -> str:
    looked = " or ".join(str(Path(os.path.abspath(root / c))) for c in _candidates(filename))
    return (
        f"{name}: source file {filename} is missing (looked for {looked}); {why}. Fix: put the "
        f"publisher's file ({url}) there, or pass --data-dir DIR (or set HVAE_DATA_DIR) to a "
        f"folder whose {SUBDIRS[name]}/ holds it, or go online and re-run to download it"
    )


def _ensure_file(name: str, root: Path, entry: tuple, download: bool) -> Path:
    filename, url, kind, checksum = entry
    for cand in _candidates(filename):
        if (root / cand).is_file():
            return root / cand
    if not download:
        raise HVAEError(_missing_message(name, root, filename, url, "downloading is off (download=False)"))
    dest = root / filename
    _download(name, root, filename, url, kind, checksum)
    return dest


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr)


def _download(name: str, root: Path, filename: str, url: str, kind: str | None,
              checksum: str | None) -> None:
    """Download ``url`` to a temp file in ``root``, verify it, then move it to ``root/filename``."""
    dest = root / filename
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=root)
    except OSError as exc:
        raise HVAEError(
            f"{name}: source file {filename} is missing and cannot be downloaded into "
            f"{os.path.abspath(root)} ({_one_line(exc)}). Fix: pass --data-dir DIR (or set "
            f"HVAE_DATA_DIR) to a writable folder, or put the publisher's file ({url}) at "
            f"{os.path.abspath(dest)}"
        ) from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                req = urllib.request.Request(url, headers={"User-Agent": "hvae-fast"})
                with urllib.request.urlopen(req, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length") if resp.headers else None
                    bar = _progress(int(length) if length and length.isdigit() else None, filename)
                    try:
                        while True:
                            chunk = resp.read(1 << 20)
                            if not chunk:
                                break
                            out.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                    finally:
                        if bar is not None:
                            bar.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, EOFError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise HVAEError(
                _missing_message(name, root, filename, url,
                                 f"downloading it from {url} failed: {_one_line(reason)}")
            ) from None
        _verify_download(tmp, filename, url, kind, checksum, dest)
        os.replace(tmp, dest)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _file_digest(path: Path, algo: str, gunzip: bool = False) -> str:
    h = hashlib.new(algo)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _verify_download(tmp: Path, filename: str, url: str, kind: str | None, checksum: str | None,
                     dest: Path) -> None:
    """Check a fresh download; raise HVAEError (the caller deletes ``tmp``) if it is bad."""
    fix = (f"Fix: re-run to try again (the server may have sent an error page), or fetch the "
           f"file yourself, check it, and put it at {os.path.abspath(dest)}")
    if kind is None:
        if filename.endswith(".mat"):
            try:
                _read_omniglot_mat(tmp)
            except HVAEError:
                raise HVAEError(
                    f"downloaded {filename} from {url}, but it does not load as IWAE's chardata.mat "
                    "(a MATLAB file with 784 x N arrays 'data' and 'testdata' in [0, 1]; no checksum "
                    f"is published for it); the bad download was deleted. {fix}"
                ) from None
        return
    algo, gunzip = {"sha256": ("sha256", False), "sha256-gunzip": ("sha256", True),
                    "md5": ("md5", False)}[kind]
    try:
        actual = _file_digest(tmp, algo, gunzip)
    except (OSError, EOFError, zlib.error) as exc:
        actual = f"unreadable ({_one_line(exc)})"
    if actual != checksum:
        what = f"{algo} of its uncompressed content" if gunzip else algo
        raise HVAEError(
            f"downloaded {filename} from {url}, but its {what} is {actual}, expected {checksum}; "
            f"the bad download was deleted. {fix}"
        )


# --------------------------------------------------------------------------------------------
# Parsers (each raises HVAEError naming the file on any malformed input)
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if path.name.endswith(".gz") and not isinstance(exc, (FileNotFoundError, PermissionError)):
            raise _corrupt(path, f"not a valid gzip file or truncated ({_one_line(exc)})",
                           "a complete gzip-compressed file") from None
        raise HVAEError(f"cannot read {path}: {_one_line(exc)}. Fix: check the file's permissions, "
                        "or pass --data-dir to a folder you can read") from None


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX uint8 array file (magic 0x0000080N) with ``ndim`` dimensions."""
    raw = _read_bytes(path)
    want_magic = 0x0800 | ndim
    kind = "IDX image file" if ndim == 3 else "IDX label file"
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes", f"an {kind} (magic number 0x{want_magic:08x})")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != want_magic:
        raise _corrupt(path, f"bad magic number 0x{magic:08x}",
                       f"0x{want_magic:08x} (an {kind} of unsigned bytes)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"truncated header ({len(raw)} bytes)", f"a {header}-byte header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != want:
        raise _corrupt(path, f"{len(raw)} bytes (wrong size, truncated?)",
                       f"{want} bytes for an array of shape {tuple(dims)}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise _corrupt(path, f"images of shape {tuple(dims[1:])}", "28x28 MNIST images")
    if ndim == 1 and arr.size and int(arr.max()) > 9:
        raise _corrupt(path, f"a label {int(arr.max())}", "labels 0..9")
    return arr


def _parse_amat(path: Path) -> np.ndarray:
    """A Larochelle binarized-MNIST .amat (or .amat.gz): one image a line, 784 '0'/'1' values
    separated by spaces. Parsed on raw bytes with numpy (a 78 MB file takes well under a second)."""
    raw = _read_bytes(path)
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
        raise _corrupt(path, f"a value {ch!r} (value number {int(bad[0])})",
                       "only the values 0 and 1 separated by spaces")
    n_lines = sum(1 for line in raw.split(b"\n") if line.strip())
    if vals.size == 0 or vals.size % 784 or vals.size // 784 != n_lines:
        raise _corrupt(path, f"{vals.size} values on {n_lines} lines",
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


def _parse_cifar_tar(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The CIFAR-10 python-version tarball -> {"train": (x [50000,3,32,32], y), "test": (...)}.
    Streams the tarball once (no random access into the gzip stream)."""
    import tarfile

    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    member = "?"
    try:
        with tarfile.open(path, "r|*", bufsize=1 << 20) as tar:
            for info in tar:
                if info.name not in _CIFAR_MEMBERS or not info.isfile():
                    continue
                member = info.name
                f = tar.extractfile(info)
                assert f is not None
                batch = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
                if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                    raise _corrupt(path, f"member {member} holds {keys}",
                                   'a dict with b"data" and b"labels"')
                data = np.asarray(batch[b"data"])
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
                if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                        or labels.shape != (data.shape[0],):
                    raise _corrupt(path, f"member {member} has data {data.dtype}{list(data.shape)} "
                                   f"and {labels.size} labels",
                                   "uint8 data of shape [N, 3072] with N labels")
                if labels.size and (labels.min() < 0 or labels.max() > 9):
                    raise _corrupt(path, f"member {member} has labels outside 0..9", "labels 0..9")
                found[member] = (data, labels)
    except HVAEError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"not a readable tar.gz archive ({_one_line(exc)})",
                       "the CIFAR-10 python-version tarball") from None
    except Exception as exc:  # pickle errors and whatever a damaged pickle stream raises
        raise _corrupt(path, f"member {member} is not a readable CIFAR batch pickle "
                       f"({type(exc).__name__}: {_one_line(exc)})",
                       'pickled dicts with b"data" and b"labels"') from None
    missing = [m for m in _CIFAR_MEMBERS if m not in found]
    if missing:
        raise _corrupt(path, f"missing member(s) {', '.join(missing)}",
                       f"members {', '.join(_CIFAR_MEMBERS)}")
    train = [found[m] for m in _CIFAR_MEMBERS[:5]]
    x_train = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = found[_CIFAR_MEMBERS[5]]
    return {"train": (x_train, y_train), "test": (x_test.reshape(-1, 3, 32, 32), y_test)}


def _read_omniglot_mat(path: Path) -> dict[str, np.ndarray]:
    """IWAE's chardata.mat -> {"train": float32 [N,1,28,28], "test": ...}, row-major images."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["data", "testdata"], appendmat=False)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, ... on bad files
        raise _corrupt(path, f"not a readable MATLAB file ({type(exc).__name__}: {_one_line(exc)})",
                       "IWAE's chardata.mat (a MATLAB v5 file)") from None
    out = {}
    for key, split in (("data", "train"), ("testdata", "test")):
        if key not in mat:
            raise _corrupt(path, f"no variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})",
                           "variables 'data' and 'testdata' (784 x N grey levels)")
        m = np.asarray(mat[key])
        if m.ndim != 2 or m.shape[0] != 784 or not np.issubdtype(m.dtype, np.number):
            raise _corrupt(path, f"{key!r} of shape {list(m.shape)} and dtype {m.dtype}",
                           f"{key!r} a 784 x N numeric array")
        m = m.astype(np.float32)
        if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 1):
            raise _corrupt(path, f"{key!r} has values outside [0, 1]", "grey levels in [0, 1]")
        # Each column is a column-major 28x28 image: transpose to row-major.
        x = m.T.reshape(-1, 28, 28).transpose(0, 2, 1)
        out[split] = np.ascontiguousarray(x).reshape(-1, 1, 28, 28)
    return out


# --------------------------------------------------------------------------------------------
# Builders: source files -> every split they yield, as (images, labels|None, indices|None)
# --------------------------------------------------------------------------------------------

_Split = tuple  # (images np, labels np | None, indices np | None)


def _carve(name: str, x: np.ndarray, y: np.ndarray | None, path: Path) -> dict[str, _Split]:
    n_valid, seed = _VALID_SPLIT[name]
    if x.shape[0] <= n_valid:
        raise _corrupt(path, f"only {x.shape[0]} training images",
                       f"more than {n_valid} (the validation split holds {n_valid})")
    tr, va = split_indices(x.shape[0], n_valid, seed)
    pick = (lambda a, i: None if a is None else a[i])
    return {"train": (x[tr], pick(y, tr), tr.astype(np.int64)),
            "valid": (x[va], pick(y, va), va.astype(np.int64))}


def _build_mnist(sources: list[Path], split: str) -> dict[str, _Split]:
    images_path, labels_path = sources
    x = _parse_idx(images_path, 3)
    y = _parse_idx(labels_path, 1).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise HVAEError(
            f"{images_path} holds {x.shape[0]} images but {labels_path} holds {y.shape[0]} labels; "
            "expected equal counts. Fix: delete both and re-run to download them again, or replace "
            "them with the publisher's files"
        )
    x = x.reshape(-1, 1, 28, 28)
    if split == "test":
        return {"test": (x, y, None)}
    return _carve("mnist", x, y, images_path)


def _build_binarized(sources: list[Path], split: str) -> dict[str, _Split]:
    return {split: (_parse_amat(sources[0]), None, None)}


def _build_cifar(sources: list[Path], split: str) -> dict[str, _Split]:
    parsed = _parse_cifar_tar(sources[0])
    out = _carve("cifar10", *parsed["train"], sources[0])
    out["test"] = (*parsed["test"], None)
    return out


def _build_omniglot(sources: list[Path], split: str) -> dict[str, _Split]:
    parsed = _read_omniglot_mat(sources[0])
    out = _carve("omniglot", parsed["train"], None, sources[0])
    out["test"] = (parsed["test"], None, None)
    return out


_BUILDERS: dict[str, Callable[[list[Path], str], dict[str, _Split]]] = {
    "mnist": _build_mnist,
    "binarized-mnist": _build_binarized,
    "cifar10": _build_cifar,
    "omniglot": _build_omniglot,
}


# --------------------------------------------------------------------------------------------
# The parsed-split cache
# --------------------------------------------------------------------------------------------


def _fingerprint(name: str, sources: list[Path]) -> str:
    parts = [f"v{_CACHE_VERSION}", name]
    for p in sources:
        st = p.stat()
        parts += [p.name, str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


_PARTS = ("images", "labels", "indices")


def _cache_files(cache_dir: Path, name: str, split: str, fp: str) -> dict[str, Path]:
    return {part: cache_dir / f"{name}-{split}-{fp}.{part}.npy" for part in _PARTS}


def _read_cache(files: dict[str, Path]) -> _Split | None:
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


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_cache(cache_dir: Path, name: str, split: str, fp: str, arrays: _Split) -> None:
    files = _cache_files(cache_dir, name, split, fp)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Stale entries of this split (an older source file) go first.
        for old in cache_dir.glob(f"{name}-{split}-*.npy"):
            if old not in files.values():
                old.unlink(missing_ok=True)
        # images last: _read_cache treats a split whose images file exists as complete.
        for part, arr in zip(("labels", "indices", "images"), (arrays[1], arrays[2], arrays[0])):
            if arr is not None:
                _atomic_save(files[part], arr)
            else:
                files[part].unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(
            f"could not cache the parsed {name} {split} split in {cache_dir} ({_one_line(exc)}); "
            "loading will re-parse the source each time. Set HVAE_CACHE_DIR to a writable folder.",
            RuntimeWarning,
            stacklevel=3,
        )


def _load_split(name: str, split: str, sources: list[Path]) -> _Split:
    cache_dir = resolve_cache_dir()
    fp = _fingerprint(name, sources)
    hit = _read_cache(_cache_files(cache_dir, name, split, fp))
    if hit is not None:
        return hit
    built = _BUILDERS[name](sources, split)
    for s, arrays in built.items():
        _write_cache(cache_dir, name, s, fp, arrays)
    return built[split]


def _to_torch(arr: np.ndarray | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if arr is None:
        return None
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    t = torch.from_numpy(arr)
    return t.to(dtype) if dtype is not None else t


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load one split of a dataset (see the module docstring), downloading missing source files
    into ``resolve_data_dir(data_dir)/<subdir>`` when ``download`` is true. Parsed splits are
    cached in ``resolve_cache_dir()``; a second load reads only the cache."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise HVAEError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise HVAEError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir) / SUBDIRS[key]
    sources = [_ensure_file(key, root, entry, download) for entry in _needed_sources(key, split)]
    images, labels, indices = _load_split(key, split, sources)
    return ImageDataset(
        name=key,
        split=split,
        images=_to_torch(images),
        labels=_to_torch(labels, torch.int64),
        binarize=_BINARIZE[key],
        indices=_to_torch(indices, torch.int64),
    )
