"""Datasets in memory and the batches the model sees.

``ImageDataset`` holds one split: images uint8 [N, C, H, W] (or float32 grey levels in [0, 1]),
labels int64 [N] or None. ``to_model_input`` turns images into float32 model input [B, C, H, W]
(0/1 for Bernoulli likelihoods, [-1, 1] for the logistic one). ``BatchStream`` is the endless,
resumable training stream; ``eval_batches`` the finite, fixed-draw evaluation pass;
``split_indices`` the train/valid construction.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from hvae_fast.errors import HVAEError

from .datasets import BINARIZE_MODES, LIKELIHOOD


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
        return LIKELIHOOD[self.binarize]

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


def split_indices(n: int, n_valid: int, seed: int, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices into a training file of ``n`` images: ``valid`` is the first (or with
    ``last``, the last) ``n_valid`` entries of ``np.random.RandomState(seed).permutation(n)``,
    ``train`` the rest; both sorted."""
    perm = np.random.RandomState(seed).permutation(n)
    cut = n - n_valid if last else n_valid
    train, valid = (perm[:cut], perm[cut:]) if last else (perm[cut:], perm[:cut])
    return np.sort(train), np.sort(valid)

