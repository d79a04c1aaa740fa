"""`hvae-fast memory`: the CPU memory measure against hand counts, and the subcommand end to end."""

import csv
import json

import pytest
import torch

from hvae_fast import cli
from hvae_fast.experiments.memory import SavedTensorCounter, cpu_peak, step_memory
from hvae_fast.reporting.memory_table import COLUMNS, CSV_COLUMNS

F32 = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_memory_of_linear_tanh_by_hand():
    """loss = tanh(x W^T + b).sum(), x [B, I] (no grad), Linear(I, O), Adam.

    Saved for backward: addmm keeps x (for dL/dW; W itself only if x needed a gradient, and W is a
    parameter, counted once below anyway); tanh keeps its output [B, O]; sum keeps nothing.
    Parameters and gradients: O*I + O each. Adam: exp_avg and exp_avg_sq per parameter, plus one
    float32 scalar `step` per parameter tensor (2 tensors).
    """
    B, I, O = 3, 7, 5
    torch.manual_seed(0)
    lin = torch.nn.Linear(I, O)
    x = torch.randn(B, I)
    opt = torch.optim.Adam(lin.parameters())
    r = step_memory(lin, lambda m: torch.tanh(m(x)).sum(), opt, "cpu")
    n = O * I + O
    assert r["saved"] == (B * I + B * O) * F32
    assert r["params"] == r["grads"] == n * F32
    assert r["optimizer"] == 2 * n * F32 + 2 * F32
    assert r["counted"] == r["saved"] + 4 * n * F32 + 2 * F32 == 792
    assert r["cuda_peak"] is None and r["rss_peak"] > 0


def test_cpu_peak_of_known_allocations():
    # a: 4000 B, b: 8000 B (peak 12000), a freed, c: 2000 B; b and c returned (live at the end).
    def toy():
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        c = torch.empty(500)
        return b, c

    (b, c), peak, net = cpu_peak(toy)
    assert (peak, net) == (12000, 10000)
    # Frees of memory allocated before the call lower the running sum; they never raise the peak.
    _, peak, net = cpu_peak(lambda: b.resize_(0).untyped_storage().resize_(0))
    assert (peak, net) == (0, -8000)


def test_true_cpu_peak_of_linear_tanh_sgd_step_by_hand():
    """loss = tanh(x W^T + b).sum(), Linear(I=7, O=5), x [3, 7], plain SGD (updates in place).

    Live at the start: W, b (35 + 5 floats) and x (21): 244 B. The forward's addmm output (15 floats)
    is freed once tanh has its output y; backward frees y after tanh_backward. The peak comes at the
    end of backward: the loss and its grad (1 + 1 floats), dL/dy's tanh_backward output (15), and the
    gradients of W and b (35 + 5): 228 B above the start, 472 B in all.
    """
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    r = step_memory(lin, lambda m: torch.tanh(m(x)).sum(), torch.optim.SGD(lin.parameters(), lr=0.1), "cpu",
                    inputs=(x,))
    assert r["cpu_peak"] == (40 + 21) * F32 + (2 + 15 + 40) * F32 == 472
    assert r["counted"] == r["saved"] + 2 * 40 * F32 == (21 + 15) * F32 + 80 * F32


def test_saved_tensor_counter_dedups_storages_and_skips_excluded():
    w = torch.nn.Parameter(torch.randn(6))
    x = torch.randn(6)
    with SavedTensorCounter(exclude={w.untyped_storage().data_ptr()}) as c:
        y = torch.tanh(x * w)  # mul keeps x (w excluded); tanh keeps y
        (y * y).sum()  # mul keeps y twice: the same storage, counted once
    assert c.bytes == 2 * 6 * F32
    assert len(c.seen) == 2


def test_memory_command_small_cpu(tmp_path, capsys):
    js, cs, png = tmp_path / "m.json", tmp_path / "m.csv", tmp_path / "m.png"
    rc = cli.main(["memory", "--device", "cpu", "--batch-size", "2", "--channels", "8", "--blocks", "1",
                   "--depths", "2", "--baseline-depths", "2", "--models", "vae,hvae,iwae,lvae,biva",
                   "--backend", "torch", "--samples", "3", "--json", str(js), "--csv", str(cs), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "CPU measure" in out and "CPU peak: the true peak" in out
    rows = json.loads(js.read_text())["rows"]
    assert [(r["model"], r["layers"]) for r in rows] == [("vae", 2), ("hvae", 2), ("iwae", 2), ("lvae", 2), ("biva", 2)]
    with open(cs) as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == CSV_COLUMNS
        assert len(list(rd)) == 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {r["model"]: r for r in rows}
    for r in rows:
        assert set(r) >= set(COLUMNS)
        assert r["memory_bytes"] == r["counted_bytes"] == (r["saved_bytes"] + r["param_bytes"] + r["grad_bytes"]
                                                           + r["optimizer_bytes"])
        assert r["parameters"] * F32 == r["param_bytes"] == r["grad_bytes"]
        assert r["ratio_to_vae"] == pytest.approx(r["memory_bytes"] / by["vae"]["memory_bytes"], rel=1e-2)
        # The true peak holds the step's transients too; on these shapes every model has some.
        assert r["cpu_peak_bytes"] > r["param_bytes"] + r["optimizer_bytes"]
        assert r["cpu_peak_ratio_to_vae"] == pytest.approx(r["cpu_peak_bytes"] / by["vae"]["cpu_peak_bytes"], rel=1e-2)
    assert by["hvae"]["memory_bytes"] > by["vae"]["memory_bytes"]
    assert by["iwae"]["memory_bytes"] > by["hvae"]["memory_bytes"]
    assert by["hvae"]["backend"] == "torch" and by["vae"]["ratio_to_vae"] == 1.0


def test_the_ladders_smoothed_rows_beside_their_plain_baselines(tmp_path, capsys):
    """lvae/biva stay the paper's unsmoothed baselines at any --rho; their -ou rows and the VDVAE-style
    ladder's smooth at --rho with the OU backend, and hold the K-sample pass's activations."""
    js = tmp_path / "m.json"
    rc = cli.main(["memory", "--device", "cpu", "--batch-size", "2", "--channels", "8", "--blocks", "1",
                   "--baseline-depths", "3", "--models", "lvae,lvae-ou,biva,biva-ou,ladder,ladder-ou",
                   "--backend", "torch", "--samples", "3", "--rho", "0.8", "--json", str(js)])
    assert rc == 0
    by = {r["model"]: r for r in json.loads(js.read_text())["rows"]}
    assert [by[m]["layers"] for m in ("lvae", "lvae-ou", "biva", "biva-ou", "ladder", "ladder-ou")] == [3, 3, 3, 3, 6, 6]
    for plain in ("lvae", "biva", "ladder"):
        ou = by[plain + "-ou"]
        assert by[plain]["backend"] == "-" and ou["backend"] == "torch"
        assert ou["parameters"] == by[plain]["parameters"]  # smoothing adds no weights
        assert ou["saved_bytes"] > by[plain]["saved_bytes"]  # the K = 3 samples' activations
        assert ou["ratio_to_unsmoothed"] == pytest.approx(ou["memory_bytes"] / by[plain]["memory_bytes"], rel=1e-3)
        assert by[plain]["ratio_to_unsmoothed"] is None
    assert "x unsmoothed" in capsys.readouterr().out


def test_a_smoothed_ladder_row_needs_rho_below_one():
    from hvae_fast.errors import HVAEError
    from hvae_fast.experiments import memory

    with pytest.raises(HVAEError, match="rho below 1"):
        memory.measure("lvae-ou", 2, batch_size=1, rho=1.0, channels=4, blocks=1, backend="torch")


def test_memory_rejects_unknown_model():
    with pytest.raises(SystemExit):
        cli.main(["memory", "--models", "vae,gan"])


def test_the_profilers_usdt_lines_stay_out_of_the_output(capfd):
    """kineto prints `USDT:` lines from C++ (stdio and raw writes, either stream) around a profile on
    some builds; cpu_peak keeps them out of `memory`'s output and passes every other line through."""
    import ctypes
    import os

    def chatty():
        os.write(1, b"USDT: profiler started\n")
        os.write(2, b"USDT: profiler stopped\nkept on stderr\n")
        ctypes.CDLL(None).printf(b"USDT: buffered in C stdio\n")
        print("kept on stdout")
        return torch.empty(10)

    t, peak, _ = cpu_peak(chatty)
    out, err = capfd.readouterr()
    assert "USDT" not in out + err, (out, err)
    assert "kept on stdout" in out and "kept on stderr" in err
    assert t.shape == (10,) and peak == 40
