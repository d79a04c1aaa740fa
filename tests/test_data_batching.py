"""hvae_fast.data.batching: model input (binarisation, scaling), training streams, evaluation batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvae_fast import data as D
from hvae_fast.errors import HVAEError

from datatools import isolated_env, one_line_error, real  # noqa: F401  (fixtures)


def test_dynamic_binarisation():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (500, 1, 28, 28), dtype=np.uint8))
    images[0] = 0
    images[1] = 255
    g = torch.Generator().manual_seed(1)
    b = D.to_model_input(images, "dynamic", g)
    assert b.dtype == torch.float32 and b.shape == images.shape
    assert set(torch.unique(b).tolist()) == {0.0, 1.0}
    assert torch.all(b[0] == 0) and torch.all(b[1] == 1)  # p = 0 and p = 1 are exact
    # 392k Bernoulli draws: the std of the mean is < 0.0008; allow 0.004 (5 sigma).
    assert abs(b.mean().item() - (images.float() / 255).mean().item()) < 0.004
    same = D.to_model_input(images, "dynamic", torch.Generator().manual_seed(1))
    other = D.to_model_input(images, "dynamic", torch.Generator().manual_seed(2))
    assert torch.equal(b, same) and not torch.equal(b, other)
    # float grey levels (omniglot) are probabilities themselves
    p = torch.full((200, 1, 28, 28), 0.3)
    fb = D.to_model_input(p, "dynamic", torch.Generator().manual_seed(0))
    assert abs(fb.mean().item() - 0.3) < 0.005


def test_static_and_logistic_input():
    x = torch.tensor([0, 1, 1, 0], dtype=torch.uint8)
    assert torch.equal(D.to_model_input(x, "static"), x.float())
    y = D.to_model_input(torch.tensor([0, 255, 51], dtype=torch.uint8), "none")
    assert torch.allclose(y, torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    with pytest.raises(HVAEError):
        D.to_model_input(x, "threshold")


def test_dynamic_binarisation_real_mnist(real):
    d = real("mnist", "test")
    batches = list(D.eval_batches(d, 1000, seed=0))
    assert len(batches) == 10
    b = torch.cat(batches)
    assert b.dtype == torch.float32 and bool(((b == 0) | (b == 1)).all())
    # 7.8M draws: the std of the mean is < 0.0002; allow 0.002.
    assert abs(b.mean().item() - d.images.sum(dtype=torch.int64).item() / d.images.numel() / 255) < 0.002
    again = torch.cat(list(D.eval_batches(d, 1000, seed=0)))
    other = torch.cat(list(D.eval_batches(d, 1000, seed=1)))
    assert torch.equal(b, again) and not torch.equal(b, other)


# ------------------------------------------------------------------------------------------
# batch streams
# ------------------------------------------------------------------------------------------


def id_dataset(n: int = 103) -> D.ImageDataset:
    """Image i holds the value i everywhere: model input (x + 1) * 127.5 recovers the index."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return D.ImageDataset("ids", "train", images, None, "none")


def ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def test_batch_stream_epochs():
    ds = id_dataset(103)
    s = D.BatchStream(ds, 10, seed=3)
    assert s.batches_per_epoch == 10
    epochs = [[i for _ in range(10) for i in ids(next(s))] for _ in range(3)]
    for e in epochs:
        assert len(e) == 100 and len(set(e)) == 100  # a permutation, last 3 dropped
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0
    full = D.BatchStream(ds, 10, seed=3, drop_last=False)
    sizes = [len(next(full)) for _ in range(11)]
    assert sizes == [10] * 10 + [3]
    ordered = D.BatchStream(ds, 10, seed=3, shuffle=False, drop_last=False)
    assert [i for _ in range(11) for i in ids(next(ordered))] == list(range(103))
    assert ids(next(D.BatchStream(ds, 10, seed=3))) == ids(next(D.BatchStream(ds, 10, seed=3)))
    assert ids(next(D.BatchStream(ds, 10, seed=3))) != ids(next(D.BatchStream(ds, 10, seed=4)))


@pytest.mark.parametrize("n_first", [0, 7, 13, 30])
def test_batch_stream_resume(n_first):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (95, 1, 8, 8), dtype=np.uint8))
    ds = D.ImageDataset("toy", "train", images, None, "dynamic")
    s = D.BatchStream(ds, 10, seed=11)  # 9 batches an epoch
    for _ in range(n_first):
        next(s)
    state = s.state_dict()
    assert state["epoch"] == n_first // 9 and state["position"] == n_first % 9
    rest = [next(s) for _ in range(15)]
    resumed = D.BatchStream(ds, 10, seed=11)
    resumed.load_state_dict(dict(state))
    for a, b in zip(rest, (next(resumed) for _ in range(15))):
        assert torch.equal(a, b)  # same images and the same binarisation draws
    # consecutive batches are different draws
    assert not torch.equal(rest[0], rest[1])
    with pytest.raises(HVAEError, match="seed"):
        D.BatchStream(ds, 10, seed=12).load_state_dict(state)


def test_eval_batches_and_batch_size_errors():
    ds = id_dataset(103)
    batches = list(D.eval_batches(ds, 10))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert [i for b in batches for i in ids(b)] == list(range(103))
    for bad in (104, 0):
        with pytest.raises(HVAEError) as e:
            D.BatchStream(ds, bad, seed=0)
        assert "batch size" in one_line_error(e)
        with pytest.raises(HVAEError):
            D.eval_batches(ds, bad)


