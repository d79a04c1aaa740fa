"""--compile: the training step under torch.compile, with the fused OU ops inside the graph.

No graph breaks (dynamo with fullgraph semantics) on CPU for the torch and cpp backends on a tiny MLP
HVAE forward + loss; a short compiled training run follows the eager one within float tolerance
(fallback_random keeps torch's RNG stream, so both draw the same noise).
"""

import json

import pytest
import torch

from hvae_fast.config import ModelConfig, OUConfig, RunConfig, TrainConfig
from hvae_fast.models.model import HierarchicalVAE, OUSmoothing
from hvae_fast.models.objectives import training_loss
from hvae_fast.ops.ou import backend_status, get_backend
from hvae_fast.training.trainer import Trainer

CPU_BACKENDS = [n for n in ("torch", "cpp") if backend_status("cpu")[n][0]]


def _tiny(name):
    torch.manual_seed(0)
    m = HierarchicalVAE(ModelConfig(arch="mlp", latent_sizes=(8, 6, 4), hidden_sizes=(16, 16, 16)), (1, 8, 8))
    x = torch.bernoulli(torch.rand(16, 1, 8, 8) * 0.6)
    return m, x, OUSmoothing(0.7, 3, get_backend(name, "cpu"))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_the_hvae_forward_and_loss_trace_without_graph_breaks(name):
    m, x, ou = _tiny(name)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        ex = torch._dynamo.explain(training_loss)(m, x, "hvae", ou, torch.tensor(1.0), 0.0, 1)
    assert ex.graph_break_count == 0, [r.reason[:300] for r in ex.break_reasons]
    assert ex.graph_count == 1
    # the fused op is a node of the graph, not traced through (or around)
    ops = {str(n.target) for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"}
    want = (["hvae_fast.correlated_samples_fwd", "hvae_fast.gaussian_head_fwd"] if name == "cpp"
            else ["hvae_fast_ref.correlated_samples"])
    assert all(any(w in o for o in ops) for w in want), sorted(ops)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fullgraph_compile_matches_eager_loss_and_gradients(name):
    # aot_eager: dynamo + AOTAutograd (the graphs inductor would compile), seconds instead of minutes
    def run(compiled):
        m, x, ou = _tiny(name)
        fn = torch.compile(training_loss, fullgraph=True, backend="aot_eager") if compiled else training_loss
        torch.manual_seed(5)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            loss = fn(m, x, "hvae", ou, torch.tensor(0.5), 0.0, 1)[0]
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()]

    (l0, g0), (l1, g1) = run(False), run(True)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _config(compile_, backend):
    t = dict(steps=4, batch_size=16, lr=2e-3, log_every=1, eval_every=100, eval_examples=32, checkpoint_every=100,
             sample_every=100, seed=3, kl_anneal=(1, 2), compile=compile_)
    return RunConfig(dataset="binarized-mnist", preset="tiny", method="hvae",
                     model=ModelConfig(arch="mlp", latent_sizes=(6, 4), hidden_sizes=(16, 8)),
                     ou=OUConfig(rho=0.8, samples=3, backend=backend), train=TrainConfig(**t), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_compiled_training_run_follows_the_eager_run(name, shared_data, tmp_path):
    # inductor, as `train --compile` runs it; kl_anneal changes beta every step (no recompile: a tensor)
    losses = {}
    for c in (False, True):
        Trainer(_config(c, name), tmp_path / str(c), data_dir=shared_data, progress=False).fit()
        recs = [json.loads(line) for line in (tmp_path / str(c) / "metrics.jsonl").read_text().splitlines()]
        losses[c] = torch.tensor([r["loss"] for r in recs if r["split"] == "train"])
    assert len(losses[True]) == 4
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-3)


def test_compile_is_a_train_flag_and_resumable():
    import subprocess
    import sys

    from hvae_fast.training.rundir import RESUMABLE_CHANGES

    assert TrainConfig().compile is False and ("train", "compile") in RESUMABLE_CHANGES
    p = subprocess.run([sys.executable, "-m", "hvae_fast", "train", "binarized-mnist", "--compile", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["train"]["compile"] is True
