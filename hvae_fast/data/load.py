"""``load_dataset``: a dataset's record -> its source files (found or downloaded, verified) ->
the parsed split (from the cache, or parsed, checked, carved and cached) -> an ``ImageDataset``."""

from __future__ import annotations

import os

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
    paths = sources.locate(spec, split, data_dir, download)
    digests = [sources.verify(src, p) for src, p in zip(spec.sources_for(split), paths)]
    # The split rule is part of the key, so a change of rule never reads splits cached under the old one.
    key = cache.split_key(spec.name, [*digests, f"valid={spec.valid_split},last={spec.valid_last}"])
    arrays = cache.read_split(spec.name, split, key)
    if arrays is None:
        built = _splits_of(spec, parsers.parse_files(spec, split, paths))
        for s, a in built.items():
            cache.write_split(spec.name, s, key, a)
        arrays = built[split]
    images, labels, indices = arrays
    return ImageDataset(name=spec.name, split=split, images=_to_torch(images),
                        labels=_to_torch(labels), binarize=spec.binarize, indices=_to_torch(indices))
