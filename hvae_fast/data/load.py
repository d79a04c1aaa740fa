"""``load_dataset``: a dataset's record -> its source files (found or downloaded, verified) ->
the parsed split (from the cache, or parsed, checked, carved and cached) -> an ``ImageDataset``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from hvae_fast.errors import HVAEError

from . import cache, parsers, sources
from .batching import ImageDataset, split_indices
from .datasets import SPLITS, DatasetSpec, get_spec


def _splits_of(spec: DatasetSpec, parsed: dict[str, parsers.Arrays]) -> dict[str, cache.Split]:
    """{split: (images, labels, indices)}: the parsed file splits, with train/valid carved out of
    the training file where the record says so (indices: each image's row in that file)."""
    out = {s: (x, y, None) for s, (x, y) in parsed.items()}
    if spec.valid_split is not None and "train" in parsed:
        x, y = parsed["train"]
        tr, va = split_indices(x.shape[0], *spec.valid_split, last=spec.valid_last)
        for s, idx in (("train", tr), ("valid", va)):
            out[s] = (x[idx], None if y is None else y[idx], idx.astype(np.int64))
    return out


def _to_torch(arr: np.ndarray | None) -> torch.Tensor | None:
    if arr is None:
        return None
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr)


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load one split (``"train"``, ``"valid"`` or ``"test"``) of a dataset, downloading missing
    source files into ``resolve_data_dir(data_dir)/<folder>`` when ``download`` is true. Source
    files are verified when first seen or changed; parsed splits are cached, so a second load reads
    only the cache."""
    spec = get_spec(name)
    if split not in SPLITS:
        raise HVAEError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    srcs = spec.sources_for(split)
    paths = sources.locate(spec, split, data_dir, download)
    on_record = [cache.known_digest(p) is not None for p in paths]
    digests = [sources.verify(src, p) for src, p in zip(srcs, paths)]
    arrays = _cached(spec, split, digests)
    if arrays is None:
        if any(on_record):
            # A parse reads the whole files anyway: hash the ones whose digest came from the
            # (size, mtime) record, so an edit that kept both, or a planted record, is caught here.
            digests = [sources.verify(src, p, trust_record=not r) for src, p, r in zip(srcs, paths, on_record)]
            arrays = _cached(spec, split, digests)
    if arrays is None:
        built = _splits_of(spec, parsers.parse_files(spec, split, paths))
        for s, a in built.items():
            cache.write_split(spec.name, s, _key(spec, digests), a, digests)
        arrays = built[split]
    images, labels, indices = arrays
    return ImageDataset(name=spec.name, split=split, images=_to_torch(images),
                        labels=_to_torch(labels), binarize=spec.binarize, indices=_to_torch(indices))


def _key(spec: DatasetSpec, digests: list[str]) -> str:
    # The split rule is part of the key, so a change of rule never reads splits cached under the old one.
    return cache.split_key(spec.name, [*digests, f"valid={spec.valid_split},last={spec.valid_last}"])


# What each format's parser produces: images' dtype and their largest value (the smallest is 0).
_IMAGE_DTYPE = {"idx": (np.uint8, 255), "amat": (np.uint8, 1), "cifar-python": (np.uint8, 255),
                "iwae-mat": (np.float32, 1.0)}


def _cached(spec: DatasetSpec, split: str, digests: list[str]) -> cache.Split | None:
    """The cached split, if its entry matches its record and the dataset's record (count, shape,
    dtype, value range, labels 0..9, indices in the training file); else None (with a warning
    where an entry was there)."""
    arrays = cache.read_split(spec.name, split, _key(spec, digests), digests)
    if arrays is None:
        return None
    images, labels, indices = arrays
    dtype, top = _IMAGE_DTYPE[spec.format]
    n = spec.split_size(split)
    problem = None
    if images.dtype != dtype or images.shape != (n, *spec.image_shape):
        problem = f"images {images.dtype}{list(images.shape)}, expected {np.dtype(dtype)}{[n, *spec.image_shape]}"
    elif images.size and not (images.min() >= 0 and images.max() <= top):  # NaN fails both
        problem = f"images outside 0..{top}"
    elif labels is not None and (labels.dtype != np.int64 or (labels.size and (labels.min() < 0 or labels.max() > 9))):
        problem = "labels that are not 0..9"
    elif indices is not None and (indices.dtype != np.int64 or (indices.size and (
            indices.min() < 0 or indices.max() >= spec.file_sizes["train"]))):
        problem = "indices outside the training file"
    if problem is not None:
        warnings.warn(f"the cached {spec.name} {split} split holds {problem}; parsing the source "
                      "files again", RuntimeWarning, stacklevel=3)
        return None
    return arrays
