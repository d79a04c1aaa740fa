"""Data-parallel training under torchrun (distributed.py): W processes with the global batch B train
like one process with batch B, checkpoints hold every process's state, resume is exact."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvae_fast import distributions
from hvae_fast.cli import main
from hvae_fast.training.distributed import SEED_STRIDE, World, shard_backend
from hvae_fast.training.evaluate import evaluate
from hvae_fast.ops.ou import get_backend
from hvae_fast.training.rundir import load_checkpoint

# A 2-layer MLP HVAE small enough that a 2-process run starts and trains in seconds; rho steered by
# the controller, which must see the same (all-reduced) top-layer KL as one process does; free bits,
# whose clamp must decide on the whole batch's KL means (layer 1's crosses the 1-nat floor at step 2,
# the top layer's stays below it: both sides of the clamp).
TINY = ["--latent-sizes", "8,4", "--hidden-sizes", "64,32", "--ou-samples", "3", "--backend", "torch",
        "--rho-control", "2", "--rho", "0.8", "--free-bits", "1"]
# Tolerances between W processes and one: the batch mean and the gradient mean over processes sum in
# another order (float32 rounding, ~1e-7 relative a step), nothing else differs. The logged numbers
# agree to RTOL; the weights to WEIGHT_ATOL, as Adam's g / sqrt(v) turns the rounding of a first-layer
# gradient that is nearly zero (a pixel that is almost never on) into up to ~3e-5 of weight. (Other
# noise would move the loss by nats and the weights by ~lr = 1e-3.)
RTOL, ATOL, WEIGHT_ATOL = 1e-5, 1e-5, 1e-4


def train_argv(out, data, steps, batch=16, *extra):
    return ["train", "binarized-mnist", "--preset", "mnist-mlp-40x4", *TINY, "--device", "cpu", "--steps", str(steps),
            "--batch-size", str(batch), "--log-every", "1", "--eval-every", "10", "--eval-examples", "40",
            "--checkpoint-every", "5", "--sample-every", "1000", "--data-dir", str(data), "--out", str(out),
            "--no-progress", *extra]


def torchrun(argv, nproc=2, background=False):
    """``torchrun --nproc_per_node nproc -m hvae_fast ARGV`` with gloo on CPU, one thread a process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "hvae_fast", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def records(run, split="train"):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == split]


# -- the pieces, in one process ------------------------------------------------------------------

@pytest.mark.parametrize("n,size", [(16, 2), (7, 3), (2, 4), (64, 8)])
def test_rows_split_a_batch_into_contiguous_disjoint_shares(n, size):
    shares = [World(rank=r, size=size).rows(n) for r in range(size)]
    assert [i for s in shares for i in range(n)[s]] == list(range(n))
    assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


@pytest.mark.parametrize("k", [1, 3])
def test_normal_like_in_a_shard_is_the_shards_rows_of_the_whole_batchs_noise(k):
    total, shape = 6, (5, 2)
    torch.manual_seed(0)
    whole = torch.randn_like(torch.empty(k * total, *shape)).view(k, total, *shape)
    for first, rows in [(0, 3), (3, 3), (2, 1)]:
        torch.manual_seed(0)
        with distributions.batch_shard(first, rows, total):
            eps = distributions.normal_like(torch.empty(k * rows, *shape))
        assert torch.equal(eps.view(k, rows, *shape), whole[:, first:first + rows])
    torch.manual_seed(0)
    assert torch.equal(distributions.normal_like(torch.empty(k * total, *shape)), whole.flatten(0, 1))


def test_the_torch_backend_of_a_rank_gives_its_rows_of_the_whole_batch_and_their_gradients():
    torch.manual_seed(1)
    z, mu = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    sigma = torch.rand(6, 4, dtype=torch.float64) + 0.1
    g = torch.randn(3, 6, 4, dtype=torch.float64)
    ref = get_backend("torch", "cpu")
    inputs = [t.clone().requires_grad_() for t in (z, mu, sigma)]
    whole = ref.correlated_samples(*inputs, 0.7, 3, 1234)
    (whole * g).sum().backward()
    for rank in range(2):
        rows = World(rank=rank, size=2).rows(6)
        mine = [t[rows].clone().requires_grad_() for t in (z, mu, sigma)]
        out = shard_backend(ref, World(rank=rank, size=2)).correlated_samples(*mine, 0.7, 3, 1234)
        assert torch.equal(out, whole[:, rows].detach())
        (out * g[:, rows]).sum().backward()
        for a, b in zip(mine, inputs):
            assert torch.allclose(a.grad, b.grad[rows], rtol=1e-12, atol=1e-12)


def test_a_fused_backend_gets_a_seed_of_each_ranks_own():
    calls = []
    fused = get_backend("torch", "cpu").__class__(
        name="fake-fused", correlated_samples=lambda z, mu, sigma, rho, K, seed: calls.append(seed),
        gaussian_head_logprob=None, correlated_noise=None, probe=None)
    z = torch.zeros(2, 3)
    for rank in range(3):
        shard_backend(fused, World(rank=rank, size=3)).correlated_samples(z, z, z, 0.5, 2, 2**62 - 1)
    assert calls == [(2**62 - 1 + r * SEED_STRIDE) % 2**63 for r in range(3)]
    assert len(set(calls)) == 3 and all(0 <= c < 2**63 for c in calls)
    assert shard_backend(fused, World()) is fused


def test_evaluate_with_a_reduce_counts_every_process_examples():
    """Two processes that held the same examples: twice the examples, the same means and active units."""
    from hvae_fast.config import ModelConfig
    from hvae_fast.models.model import build_model

    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(arch="mlp", latent_sizes=(4, 2), hidden_sizes=(16, 8)), (1, 28, 28))
    xs = [(torch.rand(10, 1, 28, 28) < 0.3).float() for _ in range(2)]
    one = evaluate(model, lambda: iter(xs), "cpu", au_samples=3)
    two = evaluate(model, lambda: iter(xs), "cpu", au_samples=3, reduce=lambda t: 2 * t)
    assert two["num_examples"] == 2 * one["num_examples"] == 40
    for key in ("elbo", "recon", "kl_total"):
        assert two[key] == pytest.approx(one[key], rel=1e-12)
    assert two["kl_per_layer"] == pytest.approx(one["kl_per_layer"], rel=1e-12)
    assert two["active_units"] == one["active_units"]


# -- torchrun ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """A 2-process torchrun run with global batch 16 (8 a process) and a 1-process run with batch 16."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}: set HVAE_DATA_DIR")
    root = tmp_path_factory.mktemp("ddp")
    one = root / "one"
    assert main(train_argv(one, SHARED_DATA, 12)) == 0
    two = root / "two"
    p = torchrun(train_argv(two, SHARED_DATA, 12))
    assert p.returncode == 0, p.stderr
    return two, one, p


def test_two_processes_with_the_global_batch_train_like_one_process(two_and_one):
    two, one, p = two_and_one
    a, b = records(two), records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    assert len({r["rho"] for r in a}) > 3  # the controller moved rho
    for key in ("loss", "train_bound", "elbo", "recon", "top_kl", "rho"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=RTOL, abs=ATOL), key
    assert a[-1]["loss"] < a[0]["loss"] - 5  # it trained: the weights moved, by the same updates
    sa, sb = (load_checkpoint(d / "checkpoint-latest.pt", "cpu") for d in (two, one))
    for k, v in sa["model"].items():
        torch.testing.assert_close(v, sb["model"][k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    # Sharded validation: every one of the 40 examples is counted once.
    va, vb = records(two, "valid"), records(one, "valid")
    assert [v["num_examples"] for v in va] == [v["num_examples"] for v in vb] == [40, 40]
    assert [v["elbo"] for v in va] == pytest.approx([v["elbo"] for v in vb], abs=5.0)  # each process its own MC noise
    # Rank 0 alone logs and speaks.
    assert p.stderr.count("data-parallel: 2 processes (DDP, gloo); global batch 16, 8 per process") == 1
    assert p.stdout.count("done: 12 steps") == 1


def test_a_checkpoint_holds_every_process_state_and_resumes_only_with_as_many(two_and_one, shared_data, capsys):
    two, one, _ = two_and_one
    st = load_checkpoint(two / "checkpoint-latest.pt", "cpu")
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    for r in st["ranks"]:
        assert r["stream"] == st["stream"] and torch.equal(r["rng_cpu"], st["rng_cpu"])
    assert load_checkpoint(one / "checkpoint-latest.pt", "cpu")["world_size"] == 1
    assert main(train_argv(two, shared_data, 14, 16, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hvae-fast: error: --resume: checkpoint-latest.pt in {two} was written by 2 process(es) "
                          f"and this run has 1;")
    assert "resume it under `torchrun --nproc_per_node 2`" in err


@pytest.mark.slow
def test_two_compiled_processes_train_like_one_eager_process(shared_data, tmp_path):
    """--compile under torchrun: DDP around the compiled model (fullgraph, so a graph break fails the
    run), the same losses as one eager process with the global batch. A constant rho (--compile
    refuses a changing one); inductor's float rounding differs, hence test_compile's tolerances."""
    argv = [a for a in train_argv(tmp_path / "one", shared_data, 6) if a not in ("--rho-control", "2")]
    assert len(argv) == len(train_argv(tmp_path / "one", shared_data, 6)) - 2
    assert main(argv) == 0
    argv[argv.index("--out") + 1] = str(tmp_path / "two")
    p = torchrun([*argv, "--compile"])
    assert p.returncode == 0, p.stderr
    a, b = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-3)
    assert p.stderr.count("global batch 16, 8 per process") == 1


@pytest.mark.slow
def test_kill_9_and_resume_ends_where_an_uninterrupted_run_does(shared_data, tmp_path):
    steps = 40
    full = tmp_path / "full"
    p = torchrun(train_argv(full, shared_data, steps))
    assert p.returncode == 0, p.stderr
    part = tmp_path / "part"
    q = torchrun(train_argv(part, shared_data, steps), background=True)
    try:
        deadline = time.monotonic() + 240
        while not (part / "metrics.jsonl").exists() or len(records(part)) < 12:
            assert q.poll() is None and time.monotonic() < deadline, q.communicate()[1]
            time.sleep(0.01)
        # torchrun starts each process in a session of its own: kill -9 the launcher and its processes.
        workers = [int(c) for c in Path(f"/proc/{q.pid}/task/{q.pid}/children").read_text().split()]
        assert len(workers) == 2
        for pid in [q.pid, *workers]:
            os.kill(pid, signal.SIGKILL)
    finally:
        q.kill()
        q.wait(60)
    saved = load_checkpoint(part / "checkpoint-latest.pt", "cpu")["step"]
    assert 10 <= saved < steps
    r = torchrun(train_argv(part, shared_data, steps, 16, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resumed {part / 'checkpoint-latest.pt'} at step {saved}" in r.stderr
    a, b = (load_checkpoint(d / "checkpoint-latest.pt", "cpu") for d in (full, part))
    assert a["step"] == b["step"] == steps
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert all(torch.equal(x["rng_cpu"], y["rng_cpu"]) for x, y in zip(a["ranks"], b["ranks"]))
    assert records(full)[-1]["loss"] == records(part)[-1]["loss"]


@pytest.mark.slow
def test_sigterm_stops_every_process_after_the_same_step_and_rank_0_prints_the_resume_command(shared_data, tmp_path):
    out = tmp_path / "run"
    q = torchrun(train_argv(out, shared_data, 100_000), background=True)
    try:
        while not (out / "metrics.jsonl").exists() or len(records(out)) < 3:
            assert q.poll() is None, q.communicate()[1]
            time.sleep(0.05)
        q.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
        _, err = q.communicate(timeout=120)
    finally:
        q.kill()
    step = load_checkpoint(out / "checkpoint-latest.pt", "cpu")["step"]
    line = [x for x in err.splitlines() if x.startswith("hvae-fast: stopped by SIGTERM")]
    assert line == [f"hvae-fast: stopped by SIGTERM after step {step}; checkpoint-latest.pt holds step {step}: resume "
                    f"with `torchrun --nproc_per_node 2 -m hvae_fast train binarized-mnist --out {out} --resume "
                    f"--data-dir {shared_data}`"], err


@pytest.mark.slow
def test_a_global_batch_that_does_not_split_evenly_is_refused_on_every_process(shared_data, tmp_path):
    p = torchrun(train_argv(tmp_path / "run", shared_data, 4, 15))
    assert p.returncode != 0
    msg = ("hvae-fast: error: --batch-size 15 is the global batch and must split evenly over the 2 processes: "
           "pass a multiple of 2")
    assert p.stderr.count(msg) == 1, p.stderr  # rank 0 says it; rank 1 exits 2 too
    assert "exitcode  : 2" in p.stderr and "rank      : 1" in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_argument_is_reported_once_not_by_every_process(shared_data, tmp_path):
    p = torchrun(train_argv(tmp_path / "run", shared_data, 4, 16, "--compile"))  # TINY steers rho: refused
    assert p.returncode != 0
    assert p.stderr.count("hvae-fast: error: --compile traces the step with a fixed rho") == 1, p.stderr
    assert "exitcode  : 2" in p.stderr and not (tmp_path / "run").exists()
