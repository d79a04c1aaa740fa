"""``--backend auto`` (hvae_fast/ops/autotune.py): the per-op, per-shape-class decision from a measurement
cached on first use. The timer is injected (a fake ``measure``), so every test is exact; no timings."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hvae_fast.ops import autotune, ou
from hvae_fast.ops.autotune import AutoBackend, DecisionCache, shape_class

from conftest import sigterm_in_step

STATUS = ou.backend_status("cpu")
needs_cpp = pytest.mark.skipif(not STATUS["cpp"][0], reason=f"cpp backend unavailable: {STATUS['cpp'][1]}")
ENV = "test-env"


class FakeTimer:
    """measure(name, run): runs the candidate once (it must work) and returns the given seconds."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, name, run):
        run()
        self.calls.append(name)
        return self.seconds[name]


def _auto(tmp_path, timer, env=ENV):
    cands = {n: ou.BACKENDS[n] for n in ("cpp", "torch")}
    return AutoBackend("cpu", cands, DecisionCache(tmp_path / "auto.json", env), measure=timer)


def _head_inputs(K=3, B=4, C=6):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(K, B, 2 * C, generator=g, requires_grad=True)
    return out, torch.randn(B, C, generator=g)


def _head(backend, out, t, mode="mean-std"):
    return backend.gaussian_head_logprob(*out.chunk(2, dim=2), t, mode, 1e-3)


@needs_cpp
@pytest.mark.parametrize("fast", ["cpp", "torch"])
def test_fastest_candidate_wins_per_op(tmp_path, fast):
    timer = FakeTimer(cpp=1.0 if fast == "cpp" else 3.0, torch=2.0)
    auto = _auto(tmp_path, timer)
    out, t = _head_inputs()
    _head(auto.backend, out, t)
    z = torch.zeros(4, 6)
    auto.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    assert timer.calls == ["cpp", "torch", "cpp", "torch"]  # each op's class measured once, every candidate
    assert {r["choice"] for r in auto.cache.decisions.values()} == {fast}
    assert len(auto.cache.decisions) == 2
    # the decision is per op: a different op may choose differently
    timer2 = FakeTimer(cpp=1.0, torch=2.0)
    auto2 = _auto(tmp_path / "b", timer2)
    timer2.seconds = {"cpp": 1.0, "torch": 2.0}
    _head(auto2.backend, out, t)
    timer2.seconds = {"cpp": 2.0, "torch": 1.0}
    auto2.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    choices = {k.split()[0]: r["choice"] for k, r in auto2.cache.decisions.items()}
    assert choices == {"gaussian_head[mean-std]": "cpp", "correlated_samples": "torch"}


@needs_cpp
def test_a_tie_goes_to_the_first_candidate(tmp_path):
    auto = _auto(tmp_path, FakeTimer(cpp=1.0, torch=1.0))
    z = torch.zeros(4, 6)
    auto.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    assert [r["choice"] for r in auto.cache.decisions.values()] == ["cpp"]


@needs_cpp
def test_cache_hit_skips_timing_and_survives_the_process(tmp_path, caplog):
    timer = FakeTimer(cpp=2.0, torch=1.0)
    out, t = _head_inputs()
    _head(_auto(tmp_path, timer).backend, out, t)
    assert timer.calls == ["cpp", "torch"]
    data = json.loads((tmp_path / "auto.json").read_text())
    (key, rec), = data["environments"][ENV].items()
    assert key == shape_class("gaussian_head", "cpu", torch.float32, 4 * 6, 3, "mean-std")
    assert rec["choice"] == "torch" and rec["ms"] == {"cpp": 2000.0, "torch": 1000.0}

    later = FakeTimer(cpp=0.1, torch=9.0)  # a new process: the cached choice stands, nothing is timed
    auto = _auto(tmp_path, later)
    with caplog.at_level(logging.INFO, logger="hvae_fast.ops.autotune"):
        _head(auto.backend, out, t)
        _head(auto.backend, out, t)
        _head(auto.backend, *_head_inputs(B=5))  # 30 elements: the same numel bucket (4^2)
    assert later.calls == []
    logged = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert logged == [f"OU backend auto: {key} -> torch (cached; cpp 2e+03 ms, torch 1e+03 ms)"]  # once

    # another shape class (numel bucket, K, mode, dtype) or another environment measures again
    _head(auto.backend, *_head_inputs(B=40))
    _head(auto.backend, *_head_inputs(K=5))
    _head(auto.backend, *_head_inputs(), mode="ratio")
    assert later.calls == ["cpp", "torch"] * 3
    other = FakeTimer(cpp=0.1, torch=9.0)
    _head(_auto(tmp_path, other, env="another torch").backend, out, t)
    assert other.calls == ["cpp", "torch"]
    envs = json.loads((tmp_path / "auto.json").read_text())["environments"]
    assert set(envs) == {ENV, "another torch"} and len(envs[ENV]) == 4


@needs_cpp
@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "environments": {"test-env": {"k": {}}}}',
                                     '[1, 2]', '{"format": 99, "environments": {}}'])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, caplog, content):
    (tmp_path / "auto.json").write_text(content)
    timer = FakeTimer(cpp=1.0, torch=2.0)
    with caplog.at_level(logging.WARNING, logger="hvae_fast.ops.autotune"):
        auto = _auto(tmp_path, timer)
        _head(auto.backend, *_head_inputs())
    assert any("corrupt" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    data = json.loads((tmp_path / "auto.json").read_text())
    assert [r["choice"] for r in data["environments"][ENV].values()] == ["cpp"]


@needs_cpp
@pytest.mark.parametrize("fast", ["cpp", "torch"])
def test_results_are_the_chosen_backends_bit_for_bit(tmp_path, fast):
    auto = _auto(tmp_path, FakeTimer(cpp=1.0 if fast == "cpp" else 3.0, torch=2.0)).backend
    chosen = ou.BACKENDS[fast]
    for mode in ("mean-std", "ratio"):
        grads = []
        for b in (auto, chosen):
            out, t = _head_inputs()
            lp = _head(b, out, t, mode)
            lp.sum().backward()
            grads.append((lp.detach(), out.grad))
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    g = torch.Generator().manual_seed(1)
    z, mu, sigma = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    assert torch.equal(auto.correlated_samples(z, mu, sigma, 0.7, 3, 11), chosen.correlated_samples(z, mu, sigma, 0.7, 3, 11))
    assert torch.equal(auto.correlated_noise(11, 3, (4, 6)), chosen.correlated_noise(11, 3, (4, 6)))


def test_get_backend_auto_uses_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_AUTO", {})
    b = ou.get_backend("auto", "cpu")
    assert b.name == "auto" and ou.get_backend("auto", "cpu") is b
    assert autotune._AUTO["cpu"].cache.path == tmp_path / "auto-backend.json"
    z = torch.zeros(2, 3)
    b.correlated_samples(z, z, z + 1, 0.5, 2, 1)  # a real (tiny) measurement: some candidate is chosen
    path, env, decisions = autotune.cached_decisions("cpu")
    assert path == tmp_path / "auto-backend.json" and env == autotune.environment_key("cpu")
    assert [r["choice"] for r in decisions.values()][0] in autotune._AUTO["cpu"].candidates


def test_info_lists_the_cached_decisions(tmp_path, monkeypatch, capsys):
    from hvae_fast.cli import main

    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path))
    rec = {"choice": "torch", "ms": {"cpp": 2.5, "torch": 1.25}}
    key = shape_class("correlated_samples", "cpu", torch.float32, 1000, 5)
    env = autotune.environment_key("cpu")
    (tmp_path / "auto-backend.json").write_text(json.dumps({"format": 1, "environments": {env: {key: rec},
                                                                                         "other": {"x": rec}}}))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"auto decisions in {tmp_path / 'auto-backend.json'} ({env}):" in out
    assert f"    {key} -> torch (cpp 2.5 ms, torch 1.25 ms)" in out and " x -> " not in out
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["auto"]["cpu"]["decisions"] == {key: rec}


@needs_cpp
def test_auto_traces_without_graph_breaks_and_puts_the_chosen_ops_in_the_graph(tmp_path):
    # Under torch.compile the decision is made while tracing (measured, or from the cache) and is a
    # constant of the graph: the chosen backend's op is a node, nothing breaks the graph.
    from hvae_fast.models.model import HierarchicalVAE, OUSmoothing
    from hvae_fast.config import ModelConfig
    from hvae_fast.models.objectives import training_loss

    timer = FakeTimer(cpp=1.0, torch=2.0)
    auto = _auto(tmp_path, timer)
    torch.manual_seed(0)
    m = HierarchicalVAE(ModelConfig(arch="mlp", latent_sizes=(8, 6, 4), hidden_sizes=(16, 16, 16)), (1, 8, 8))
    x = torch.bernoulli(torch.rand(16, 1, 8, 8) * 0.6)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        ex = torch._dynamo.explain(training_loss)(m, x, "hvae", OUSmoothing(0.7, 3, auto.backend),
                                                  torch.tensor(1.0), 0.0, 1)
    assert ex.graph_break_count == 0, [r.reason[:300] for r in ex.break_reasons]
    ops = {str(n.target) for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert all(any(w in o for o in ops) for w in ("hvae_fast.correlated_samples_fwd", "hvae_fast.gaussian_head_fwd"))
    assert set(timer.calls) == {"cpp", "torch"}
    assert {r["choice"] for r in auto.cache.decisions.values()} == {"cpp"}


@needs_cpp
def test_a_pinned_decision_wins_over_the_cache_and_an_unavailable_one_is_measured(tmp_path, caplog):
    z = torch.zeros(4, 6)
    first = _auto(tmp_path / "a", FakeTimer(cpp=1.0, torch=2.0))
    first.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    assert list(first.used.values()) == ["cpp"]
    # another machine (its own cache) would pick torch; the checkpoint's decision is kept, unmeasured
    timer = FakeTimer(cpp=2.0, torch=1.0)
    second = _auto(tmp_path / "b", timer)
    second.pinned.update(first.used)
    with caplog.at_level(logging.INFO, logger="hvae_fast.ops.autotune"):
        got = second.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    assert timer.calls == [] and second.used == first.used
    assert "as the resumed checkpoint" in caplog.text
    assert torch.equal(got, ou.BACKENDS["cpp"].correlated_samples(z, z, z + 1, 0.5, 3, 7))
    assert torch.equal(second.correlated_noise(11, 3, (4, 6)), ou.BACKENDS["cpp"].correlated_noise(11, 3, (4, 6)))
    # a pinned backend this machine lacks: a warning, then the usual measurement
    third = AutoBackend("cpu", {"torch": ou.BACKENDS["torch"]}, DecisionCache(tmp_path / "c.json", ENV),
                        measure=FakeTimer(torch=1.0))
    third.pinned.update(first.used)
    with caplog.at_level(logging.WARNING, logger="hvae_fast.ops.autotune"):
        third.backend.correlated_samples(z, z, z + 1, 0.5, 3, 7)
    assert list(third.used.values()) == ["torch"] and "not available here" in caplog.text


@needs_cpp
def test_a_resumed_auto_run_keeps_its_checkpoints_backends(tmp_path, monkeypatch, shared_data):
    """Train with auto choosing cpp, stop; resume with an empty cache on a 'machine' where torch would
    win: nothing is measured, the resumed run keeps cpp and ends with an uninterrupted run's weights."""
    from hvae_fast.cli import main
    from hvae_fast.training.trainer import Trainer, load_checkpoint

    def train(out, steps, *extra):
        return main(["train", "binarized-mnist", "--preset", "mnist-mlp-40x4", "--latent-sizes", "6,4",
                     "--hidden-sizes", "16,8", "--ou-samples", "3", "--backend", "auto", "--device", "cpu",
                     "--steps", str(steps), "--batch-size", "8", "--eval-every", "1000", "--eval-examples", "8",
                     "--checkpoint-every", "3", "--sample-every", "1000", "--data-dir", str(shared_data),
                     "--out", str(out), "--no-progress", *extra])

    timed = []

    def fresh_machine(winner):
        """An empty cache and a fake timer under which ``winner`` (cpp, timed first, or torch) is fastest."""
        monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / f"cache-{len(timed)}-{winner}"))
        monkeypatch.setattr(autotune, "_AUTO", {})
        first_wins = winner == "cpp"  # AutoBackend times its candidates in the order cpp, torch

        def median_time(run, device, repeats=1):
            timed.append(run)
            return 1.0 if (len(timed) % 2 == 1) == first_wins else 2.0
        monkeypatch.setattr(autotune, "median_time", median_time)

    fresh_machine("cpp")
    assert train(tmp_path / "full", 6) == 0
    fresh_machine("cpp")
    orig = sigterm_in_step(monkeypatch, 2)  # arrives inside step 3, which still completes
    assert train(tmp_path / "part", 6) == 143
    monkeypatch.setattr(Trainer, "train_step", orig)
    st = load_checkpoint(tmp_path / "part" / "checkpoint-latest.pt", "cpu")
    assert st["step"] == 3 and st["auto_backend"] and set(st["auto_backend"].values()) == {"cpp"}
    fresh_machine("torch")
    n = len(timed)
    assert train(tmp_path / "part", 6, "--resume") == 0
    assert len(timed) == n  # nothing measured: every decision came from the checkpoint
    a, b = (load_checkpoint(tmp_path / d / "checkpoint-latest.pt", "cpu") for d in ("full", "part"))
    assert a["step"] == b["step"] == 6 and b["auto_backend"] == st["auto_backend"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


class _Recording:
    """A fake candidate backend: records the dtypes its head gets, optionally raises."""

    def __init__(self, name, fail=False):
        self.name, self.fail, self.dtypes = name, fail, []
        b = ou.BACKENDS["torch"]
        self.correlated_samples, self.correlated_noise, self.probe = b.correlated_samples, b.correlated_noise, b.probe

    def gaussian_head_logprob(self, mean_raw, scale_raw, target, mode, min_scale):
        self.dtypes.append((mean_raw.dtype, scale_raw.dtype, target.dtype))
        if self.fail:
            raise RuntimeError("CUDA out of memory (a fake)\nsecond line")
        return ou.BACKENDS["torch"].gaussian_head_logprob(mean_raw.float(), scale_raw.float(), target, mode, min_scale)


def test_the_head_is_timed_in_the_precision_of_the_call(tmp_path):
    # --precision bf16: the net's halves are bfloat16, the latent target float32; the candidates are
    # timed on exactly those dtypes, and the class says so (an fp32 call is another class).
    fast, slow = _Recording("fast"), _Recording("slow")
    auto = AutoBackend("cpu", {"fast": fast, "slow": slow}, DecisionCache(tmp_path / "auto.json", ENV),
                       measure=FakeTimer(fast=1.0, slow=2.0))
    out, t = _head_inputs()
    _head(auto.backend, out.detach().bfloat16(), t)
    want = (torch.bfloat16, torch.bfloat16, torch.float32)
    assert fast.dtypes[0] == want and slow.dtypes[0] == want
    (key,) = auto.cache.decisions
    assert "bfloat16/bfloat16/float32" in key
    _head(auto.backend, out.detach(), t)
    assert len(auto.cache.decisions) == 2 and fast.dtypes[-1] == (torch.float32,) * 3


def test_a_candidate_that_raises_while_timed_is_dropped_with_a_warning(tmp_path, caplog):
    bad, good = _Recording("bad", fail=True), _Recording("good")
    auto = AutoBackend("cpu", {"bad": bad, "good": good}, DecisionCache(tmp_path / "auto.json", ENV),
                       measure=FakeTimer(bad=0.5, good=2.0))
    out, t = _head_inputs()
    with caplog.at_level(logging.WARNING, logger="hvae_fast.ops.autotune"):
        _head(auto.backend, out, t)
    assert [r["choice"] for r in auto.cache.decisions.values()] == ["good"]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "bad failed while timed" in warn[0] and "CUDA out of memory (a fake)" in warn[0]
    assert "second line" not in warn[0]
    # every candidate failing is one clear error, not a traceback from inside the timing
    auto = AutoBackend("cpu", {"bad": bad}, DecisionCache(tmp_path / "b.json", ENV), measure=FakeTimer(bad=1.0))
    auto.candidates["bad2"] = _Recording("bad2", fail=True)
    auto.measure = FakeTimer(bad=1.0, bad2=1.0)
    from hvae_fast.errors import HVAEError
    with pytest.raises(HVAEError, match="every candidate failed"):
        _head(auto.backend, out, t)
