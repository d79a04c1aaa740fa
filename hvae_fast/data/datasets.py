"""One frozen record per dataset: where its files live and come from, how to check them, what they
hold, and how the model sees them. Everything else in ``hvae_fast.data`` reads these records.

Sizes are image counts; ``image_shape`` is (C, H, W) of one model input.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvae_fast.errors import HVAEError

SPLITS = ("train", "valid", "test")
BINARIZE_MODES = ("dynamic", "static", "none")
# The decoder likelihood each kind of model input calls for.
LIKELIHOOD = {"dynamic": "bernoulli", "static": "bernoulli", "none": "logistic"}


@dataclass(frozen=True)
class Source:
    """One publisher's file. ``sha256`` is of its uncompressed content (the bytes of the file, or
    of what a ``.gz`` file gunzips to) and is checked on every local copy and download; ``md5`` is
    of the file exactly as served and is checked on downloads only."""

    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None

    @property
    def candidates(self) -> tuple[str, ...]:
        """Local names accepted for it: ``.amat`` also as ``.amat.gz``, ``-ubyte.gz`` also unzipped."""
        if self.filename.endswith(".amat"):
            return (self.filename, self.filename + ".gz")
        if self.filename.endswith("-ubyte.gz"):
            return (self.filename, self.filename[:-3])
        return (self.filename,)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset.

    ``files``: split -> the sources it is read from (``valid`` absent when it is carved out of the
    training file). ``file_sizes``: images in the file(s) of each split. ``valid_split``: (n_valid,
    seed) of ``split_indices`` when the validation split is carved out of the training file;
    ``valid_last``: it holds out the permutation's last n_valid images (IWAE's OMNIGLOT protocol).
    ``class_counts``: images per label 0..9 in each split's file(s), given (and checked) where no
    content digest is published. ``format``: the parser that reads the files.
    """

    name: str
    folder: str
    format: str  # "idx" | "amat" | "cifar-python" | "iwae-mat"
    files: dict[str, tuple[Source, ...]]
    image_shape: tuple[int, int, int]
    binarize: str
    file_sizes: dict[str, int]
    valid_split: tuple[int, int] | None = None
    valid_last: bool = False
    class_counts: dict[str, tuple[int, ...]] | None = None

    @property
    def likelihood(self) -> str:
        return LIKELIHOOD[self.binarize]

    @property
    def sources(self) -> tuple[Source, ...]:
        """Every source file, once, in order."""
        return tuple(dict.fromkeys(s for srcs in self.files.values() for s in srcs))

    def file_split(self, split: str) -> str:
        """The split whose source files hold ``split`` (``valid`` may be carved out of ``train``)."""
        return "train" if split == "valid" and "valid" not in self.files else split

    def sources_for(self, split: str) -> tuple[Source, ...]:
        return self.files[self.file_split(split)]

    def split_size(self, split: str) -> int:
        """Images in ``split``."""
        if self.valid_split is not None and split in ("train", "valid"):
            n_valid = self.valid_split[0]
            return n_valid if split == "valid" else self.file_sizes["train"] - n_valid
        return self.file_sizes[split]


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


def _mnist(stem: str, sha256: str) -> Source:
    return Source(f"{stem}.gz", _MNIST_URL + f"{stem}.gz", sha256=sha256)


def _bmnist(split: str, sha256: str) -> Source:
    name = f"binarized_mnist_{split}.amat"
    return Source(name, _BMNIST_URL + name, sha256=sha256)


SPECS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec(
        name="mnist", folder="mnist", format="idx",
        files={
            "train": (_mnist("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
                      _mnist("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5")),
            "test": (_mnist("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
                     _mnist("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")),
        },
        image_shape=(1, 28, 28), binarize="dynamic",
        file_sizes={"train": 60_000, "test": 10_000}, valid_split=(10_000, 0),
    ),
    DatasetSpec(
        name="binarized-mnist", folder="binarized_mnist", format="amat",
        files={
            "train": (_bmnist("train", "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),),
            "valid": (_bmnist("valid", "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),),
            "test": (_bmnist("test", "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),),
        },
        image_shape=(1, 28, 28), binarize="static",
        file_sizes={"train": 50_000, "valid": 10_000, "test": 10_000},
    ),
    # The IWAE authors publish no checksum for chardata.mat: its structure is checked instead.
    DatasetSpec(
        name="omniglot", folder="omniglot", format="iwae-mat",
        files={s: (Source("chardata.mat",
                          "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"),)
               for s in ("train", "test")},
        image_shape=(1, 28, 28), binarize="dynamic",
        file_sizes={"train": 24_345, "test": 8_070}, valid_split=(1_345, 123), valid_last=True,
    ),
    # The offline copy is a lossless rebuild whose tarball bytes differ from the publisher's, so
    # the md5 is checked on downloads only and the structure on every copy.
    DatasetSpec(
        name="cifar10", folder="cifar10", format="cifar-python",
        files={s: (Source("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          md5="c58f30108f718f92721af3b95e74349a"),)
               for s in ("train", "test")},
        image_shape=(3, 32, 32), binarize="none",
        file_sizes={"train": 50_000, "test": 10_000}, valid_split=(5_000, 0),
        class_counts={"train": (5_000,) * 10, "test": (1_000,) * 10},
    ),
]}

DATASETS = tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
    """The record of dataset ``name`` (case and ``_``/``-`` insensitive)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in SPECS:
        raise HVAEError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return SPECS[key]


def image_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of dataset ``name``'s model input, known without reading any file."""
    return get_spec(name).image_shape


def url_of(filename: str) -> str | None:
    """The publisher's URL of a local file name (any accepted variant), if it is a known source."""
    for spec in SPECS.values():
        for src in spec.sources:
            if filename in src.candidates:
                return src.url
    return None
