"""Where a training step's time goes (issue 20): ``python bench/profile_step.py [PRESET] [--variant V]
[--before] [--json FILE]``.

Runs the benchmarked step (bench_train_step.Step: the trainer's model, optimizer, clip and batch) under
``torch.profiler`` with each phase (forward, zero_grad, backward, clip, optimizer) labelled, and splits
every phase's CPU time into: ``gemm`` (aten::mm / addmm / bmm / convolution kernels, self time), ``ou``
(the fused OU ops, hvae_fast* operators), ``other ops`` (every other aten kernel's self time:
elementwise heads, softplus, KL terms, reductions, the optimizer's and clip's arithmetic) and
``overhead`` (the rest of the phase: Python, the dispatcher, autograd's bookkeeping, the profiler's
own cost). ``--before`` swaps in what the trainer used before issue 20's changes (torch's per-tensor
Adam loop and per-tensor clip) so the two breakdowns can be printed side by side. The un-profiled
median step time is measured too, since the profiler slows small ops down.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import Step  # noqa: E402

PHASES = ("forward", "zero_grad", "backward", "clip", "optimizer")
GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
        "aten::_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
        "aten::_slow_conv2d_backward", "aten::cudnn_convolution", "aten::addmv", "aten::mv"}


def category(name: str) -> str:
    if name in GEMM:
        return "gemm"
    if name.startswith("hvae_fast"):
        return "ou"
    return "other ops"


class ProfiledStep:
    def __init__(self, preset: str, variant: str, before: bool, device):
        self.s = Step(preset, variant, torch.device(device), None)
        if before:
            self.s.opt = torch.optim.Adam(self.s.model.parameters(), lr=self.s.cfg.train.lr, foreach=False)
        self.foreach_clip = not before

    def __call__(self, label: bool = False):
        s = self.s
        with record_function("phase:forward") if label else nullcontext():
            loss = s.forward()
        with record_function("phase:zero_grad") if label else nullcontext():
            s.opt.zero_grad(set_to_none=True)
        with record_function("phase:backward") if label else nullcontext():
            loss.backward()
        with record_function("phase:clip") if label else nullcontext():
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip, foreach=self.foreach_clip)
        with record_function("phase:optimizer") if label else nullcontext():
            s.opt.step()


def breakdown(step: ProfiledStep, steps: int) -> dict:
    """{phase: {category: ms per step}} plus ``total`` and the un-profiled median step in ms."""
    for _ in range(3):
        step()
    times = []
    for _ in range(max(10, steps)):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(label=True)
    events = prof.events()
    # Each op is charged to the phase whose interval holds its start (the backward ops run on this
    # thread for CPU tensors; on CUDA this counts host-side time only).
    spans = sorted((e.time_range.start, e.time_range.end, e.name.removeprefix("phase:"))
                   for e in events if e.name.startswith("phase:"))
    out = {p: {"gemm": 0.0, "ou": 0.0, "other ops": 0.0, "overhead": 0.0, "total": 0.0} for p in PHASES}
    for a, b, p in spans:
        out[p]["total"] += (b - a) / 1e3
    for e in events:
        if not e.name.startswith(("aten::", "hvae_fast")):
            continue  # phase labels, autograd nodes, Optimizer.step: their self time is overhead
        for a, b, p in spans:
            if a <= e.time_range.start < b:
                out[p][category(e.name)] += e.self_cpu_time_total / 1e3
                break
    for p in PHASES:
        d = out[p]
        d["overhead"] = max(0.0, d["total"] - d["gemm"] - d["ou"] - d["other ops"])
        for k in d:
            d[k] /= steps
    out["step_ms_unprofiled"] = 1e3 * statistics.median(times)
    return out


def table(results: dict) -> str:
    cats = ("gemm", "ou", "other ops", "overhead", "total")
    lines = []
    for name, r in results.items():
        lines += [f"#### {name}: {r['step_ms_unprofiled']:.2f} ms per step un-profiled", "",
                  "| phase (ms per step, profiled) | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
        tot = {c: 0.0 for c in cats}
        for p in PHASES:
            lines.append(f"| {p} | " + " | ".join(f"{r[p][c]:.2f}" for c in cats) + " |")
            for c in cats:
                tot[c] += r[p][c]
        lines.append("| **step** | " + " | ".join(f"**{tot[c]:.2f}**" for c in cats) + " |")
        share = {c: tot[c] / tot["total"] for c in cats if tot["total"]}
        lines += ["", "shares of the profiled step: " + ", ".join(f"{c} {100 * share[c]:.0f}%" for c in cats[:-1]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="mnist-mlp-40x4")
    ap.add_argument("--variant", default="hvae-torch", help="a bench_train_step variant: vae, hvae-torch, hvae-cpp, ...")
    ap.add_argument("--before", action="store_true", help="also profile the pre-issue-20 optimizer and clip")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the breakdowns here")
    a = ap.parse_args(argv)
    results = {}
    if a.before:
        results[f"{a.preset} {a.variant}, before (per-tensor Adam and clip)"] = breakdown(
            ProfiledStep(a.preset, a.variant, True, a.device), a.steps)
    results[f"{a.preset} {a.variant}"] = breakdown(ProfiledStep(a.preset, a.variant, False, a.device), a.steps)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                            "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
