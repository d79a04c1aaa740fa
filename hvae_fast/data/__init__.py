"""Datasets: the one place that finds, downloads, verifies, parses, caches and batches them.

Modules
-------
``datasets``  one frozen ``DatasetSpec`` record per dataset (``SPECS``): folder, source files with
              URLs and checksums, image shape, binarisation, likelihood, sizes, validation split.
``sources``   the data dir, downloads, and content verification of local and downloaded files.
``parsers``   IDX, ``.amat``, CIFAR-10 python tarball and ``chardata.mat`` readers + structure checks.
``cache``     content digests and parsed splits (``.npy``), in ``resolve_cache_dir()``.
``batching``  ``ImageDataset``, ``to_model_input``, ``BatchStream``, ``eval_batches``.
``load``      ``load_dataset``, which ties them together.

Splits
------
* ``mnist``: 60k IDX training set -> 50,000 train / 10,000 valid (``split_indices(60000, 10000,
  seed=0)``), the 10k test set; uint8 0..255, dynamically binarised with p = pixel / 255; labels.
* ``binarized-mnist``: Larochelle & Murray's static ``.amat`` files (``.amat`` or ``.amat.gz``),
  50k / 10k / 10k, uint8 0/1.
* ``omniglot``: the IWAE ``chardata.mat`` (keys ``data``, ``testdata``; 784 x N, column-major
  images, grey levels in [0, 1]; 24,345 / 8,070 images); the LAST 1,345 images of the
  ``np.random.RandomState(123)`` permutation held out for validation (IWAE's protocol,
  ``split_indices(24345, 1345, 123, last=True)``); float32, dynamically binarised.
* ``cifar10``: the python-version tarball, only ``b"data"`` and ``b"labels"``; 45,000 train /
  5,000 valid (``split_indices(50000, 5000, seed=0)``) / 10k test; uint8 [N, 3, 32, 32], model
  input scaled to [-1, 1].

Verification
------------
MNIST's IDX files and the ``.amat`` files are checked against the sha256 of the publishers'
uncompressed content, local copies as well as downloads, when first seen and whenever their size
or mtime change. CIFAR-10 (whose md5 is checked on a fresh download only) and ``chardata.mat`` are
checked for structure: members, shapes, dtypes, value and label ranges, image and class counts.
Every user-facing failure is an ``HVAEError`` whose one-line message names the file, the problem
and the fix.
"""

from .batching import BatchStream, ImageDataset, eval_batches, split_indices, to_model_input
from .cache import resolve_cache_dir
from .datasets import DATASETS, SPECS, SPLITS, DatasetSpec, Source, get_spec, image_shape
from .load import load_dataset
from .sources import resolve_data_dir

__all__ = [
    "DATASETS",
    "SPECS",
    "SPLITS",
    "BatchStream",
    "DatasetSpec",
    "ImageDataset",
    "Source",
    "eval_batches",
    "get_spec",
    "image_shape",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_dir",
    "split_indices",
    "to_model_input",
]
