"""The trainer's optimizer step and gradient clip (training/build.py): fused Adam, foreach Adamax and a
foreach clip, checked against a float64 Adam / Adamax / global-norm clip written out here."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hvae_fast.training.build import clip_gradients, make_optimizer


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 784), (40,), (200, 40), (5, 3, 3, 3)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes], g


def _reference(name: str, p0, grads, lr: float, b1=0.9, b2=0.999, eps=1e-8):
    """float64 Adam / Adamax (torch's defaults), one parameter tensor over len(grads) steps."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        if name == "adam":
            v = b2 * v + (1 - b2) * g * g
            step = lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
        else:
            v = torch.maximum(b2 * v, g.abs() + eps)
            step = lr / (1 - b1**t) * m / v
        p = p - step
    return p


@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_the_optimizer_matches_a_float64_reference_over_steps(name):
    params, g = _params()
    p0 = [p.detach().clone() for p in params]
    opt = make_optimizer(params, name, 1e-3, "cpu")
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(5)]
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    for i, p in enumerate(params):
        ref = _reference(name, p0[i], [s[i] for s in grads], 1e-3)
        # float32 arithmetic on O(1) weights: the 5 updates of size <= 5e-3 agree to float32 rounding
        assert torch.allclose(p.detach().double(), ref, rtol=0, atol=2e-6), (name, i)


def test_adam_is_fused_and_adamax_foreach_on_cpu():
    params, _ = _params()
    assert make_optimizer(params, "adam", 1e-3, "cpu").param_groups[0]["fused"] is True
    assert make_optimizer(params, "adamax", 1e-3, "cpu").param_groups[0]["foreach"] is True


def test_a_resumed_optimizer_keeps_the_implementation_its_checkpoint_was_written_with():
    """A run checkpointed by the per-tensor Adam (before the fused one) resumes with it: the
    updates after the resume are the ones an uninterrupted run of that Adam makes, bit for bit."""
    params, g = _params()
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    old = torch.optim.Adam(params, lr=1e-3, foreach=False)
    for step in grads[:2]:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        old.step()
    state = old.state_dict()
    twin = [p.detach().clone().requires_grad_() for p in params]
    twin_opt = torch.optim.Adam(twin, lr=1e-3, foreach=False)
    twin_opt.load_state_dict(copy.deepcopy(state))  # load_state_dict keeps the given tensors
    resumed = make_optimizer(params, "adam", 1e-3, "cpu")
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.param_groups[0]["fused"] is None and resumed.param_groups[0]["foreach"] is False
    for step in grads[2:]:
        for p, q, gr in zip(params, twin, step):
            p.grad, q.grad = gr.clone(), gr.clone()
        resumed.step()
        twin_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e6])
def test_clip_gradients_scales_to_the_global_norm(max_norm):
    params, g = _params(1)
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", torch.nn.Parameter(p.detach()))
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    norm = clip_gradients(model, max_norm)
    ref = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
    assert abs(float(norm) - ref) <= 1e-5 * ref
    # torch's rule: scale by max_norm / (norm + 1e-6) when that is below 1; max_norm <= 0 clips nothing
    scale = min(1.0, max_norm / (ref + 1e-6)) if max_norm > 0 else 1.0
    for p, gr in zip(model.parameters(), grads):
        assert torch.allclose(p.grad.double(), gr.double() * scale, rtol=1e-6, atol=1e-7)


def test_clip_gradients_is_bit_identical_to_the_per_tensor_clip():
    """The foreach clip changes nothing a run computes: norm and clipped gradients as torch's default."""
    params, g = _params(2)
    grads = [torch.randn(p.shape, generator=g) * 3 for p in params]
    model = torch.nn.ParameterList([torch.nn.Parameter(p.detach()) for p in params])
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    n1 = clip_gradients(model, 1.0)
    out1 = [p.grad.clone() for p in model.parameters()]
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    n2 = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
    assert torch.equal(n1, n2)
    assert all(torch.equal(a, p.grad) for a, p in zip(out1, model.parameters()))
