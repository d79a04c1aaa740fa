"""Markdown summary of a bench/ results JSON: ``python -m hvae_fast.reporting.bench bench/results/cpu-latest.json``
(``--csv FILE``: also the numbers behind it, one row per benchmark).

One table per benchmark group (``step-<preset>``: baseline ``vae``; ``op-<op>-<mode>-<size>``:
baseline ``torch``, eager PyTorch; ``optimizer-<preset>``: baseline torch's per-tensor loop) with the median time, the ratio to the baseline measured in the
same run, peak memory and its ratio (steps), and achieved bandwidth (ops, GPU runs). Then the
project's performance targets, each printed as met / not met / not measured (never asserted):

* CPU: the ``auto`` HVAE (K=5) training step <= 1.0x the torch-backend HVAE step, on both step
  presets (the fused backends' own ratios are listed for information).
* Each fused op, forward + backward, <= 1.0x eager PyTorch at every benchmark size.
* GPU: the fused ops reach >= 70% of the GPU's memory bandwidth at the large sizes.
* GPU: the CIFAR-10 4-layer HVAE step <= 1.3x the VAE step in time and <= 1.25x in peak memory.
* CPU (``floor-<preset>`` groups, bench/bench_floor.py): the project's VAE and HVAE steps <= 1.5x
  their GEMM floor (the step's matrix multiplies alone) and faster than the hand-written eager peer
  and that peer under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FUSED = ("triton", "cuda", "cpp")
CPU_STEP_TARGET = 1.0  # the auto step vs the torch-backend step
OP_TARGET = 1.0  # each fused op (forward + backward) vs eager PyTorch
GPU_BW_TARGET = 0.70
GPU_STEP_TIME_TARGET = 1.3
GPU_STEP_MEM_TARGET = 1.25
FLOOR_TARGET = 1.5  # the project's step vs the time of its matrix multiplies alone
CIFAR_GROUP = "step-cifar10-resnet-4"
MNIST_GROUP = "step-mnist-mlp-40x4"


def _median(b) -> float:
    return float(b["stats"]["median"])


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(r) -> str:
    return "" if r is None else f"{r:.2f}x"


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _baseline_name(group: str, name: str = "") -> str:
    """The row each row of a group is divided by; in ``optimizer-`` groups torch's per-tensor loop
    of the same kind (``adam-single`` for the Adam rows, ``clip-single`` for the clip rows)."""
    if group.startswith("optimizer-"):
        return name.split("-")[0] + "-single" if name else "single"
    return "vae" if group.startswith("step-") else "torch"


def _order(name: str) -> tuple:
    pref = ["vae", "hvae-torch", "torch", "torch-compile"]
    return (pref.index(name) if name in pref else len(pref), name)


def load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def groups(data: dict) -> dict:
    out: dict = {}
    for b in data.get("benchmarks", []):
        out.setdefault(b.get("group") or "(no group)", {})[b["name"]] = b
    return out


def _is_gpu(data: dict) -> bool:
    return str(data.get("hvae_fast", {}).get("device", "cpu")).startswith("cuda")


def _group_sort_key(g: str) -> tuple:
    return (0 if g.startswith("step-") else 1 if g.startswith("floor-") else 2, g)


def _floor_refs(name: str, benches: dict) -> tuple:
    """Median seconds of the (floor, eager peer, compiled peer) of the same method as ``name`` in a
    floor group; None for one that did not run."""
    method = "hvae" if name.endswith("hvae") or "-hvae-" in name else "vae"
    refs = (benches.get(f"{kind}-{method}") for kind in ("floor", "peer", "peer-compiled"))
    return tuple(_median(r) if r else None for r in refs)


def floor_table(group: str, benches: dict) -> list:
    """A ``floor-<preset>`` group: each step's median over its GEMM floor and over both peers."""
    head = ["name", "median ms", "x GEMM floor", "x eager peer", "x compiled peer"]
    lines = [f"#### {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["floor", "peer-compiled", "peer", "hvae-fast"]
    for name in sorted(benches, key=lambda n: ([i for i, o in enumerate(order) if n.startswith(o)] + [9])[0:1] + [n]):
        t = _median(benches[name])
        refs = _floor_refs(name, benches)
        lines.append("| " + " | ".join([f"`{name}`", _fmt_ms(t)] + [_fmt_ratio(t / r if r else None) for r in refs]) + " |")
    return lines + [""]


def floor_targets(g: dict, gpu: bool) -> list:
    """The issue-20 goal per floor group: the project's steps <= FLOOR_TARGET x floor and ahead of both peers."""
    out = []
    for grp in sorted(x for x in g if x.startswith("floor-")):
        benches = g[grp]
        for name in sorted(n for n in benches if n.startswith("hvae-fast-")):
            t = _median(benches[name])
            floor, peer, comp = _floor_refs(name, benches)
            label = (f"{'GPU' if gpu else 'CPU'}: `{name}` ({grp.removeprefix('floor-')}) <= {FLOOR_TARGET}x its GEMM "
                     f"floor, ahead of the eager and compiled peers")
            if None in (floor, peer, comp):
                out.append(f"- {label}: not measured (a floor or peer result is missing)")
                continue
            ok = t <= FLOOR_TARGET * floor and t < peer and t < comp
            out.append(f"- {label}: {_status(ok)} ({t / floor:.2f}x floor, {t / peer:.2f}x eager peer, "
                       f"{t / comp:.2f}x compiled peer)")
    return out


def table(group: str, benches: dict, gpu: bool) -> list:
    step = group.startswith("step-")
    head = ["name", "median ms", f"x {_baseline_name(group)}"]
    if step:
        head += ["peak mem MiB", "mem x vae", "batch"]
        if not gpu:
            head += ["peak RSS MiB"]
    elif gpu:
        head += ["MB moved", "GB/s", "% of BW"]
    lines = [f"#### {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(benches, key=_order):
        b = benches[name]
        ei = b.get("extra_info", {})
        t, base = _median(b), benches.get(_baseline_name(group, name))
        row = [f"`{name}`", _fmt_ms(t), _fmt_ratio(t / _median(base) if base else None)]
        if step:
            mem, bmem = ei.get("peak_mem_bytes"), (base or {}).get("extra_info", {}).get("peak_mem_bytes")
            row += [_mib(mem), _fmt_ratio(mem / bmem if mem and bmem else None), str(ei.get("batch", ""))]
            if not gpu:
                row += [_mib(ei.get("peak_rss_bytes"))]
        elif gpu:
            bw, frac = ei.get("bandwidth_Bps"), ei.get("bandwidth_frac")
            row += [f"{ei['bytes'] / 1e6:.1f}" if ei.get("bytes") else "", f"{bw / 1e9:.0f}" if bw else "",
                    f"{100 * frac:.0f}%" if frac else ""]
        lines.append("| " + " | ".join(row) + " |")
    notes = {b.get("extra_info", {}).get("batch_note") for b in benches.values()} - {None, ""}
    for n in sorted(notes):
        lines += ["", f"_{n}_"]
    return lines + [""]


def records(data: dict) -> list[dict]:
    """One flat row per benchmark, the numbers behind the tables (times in seconds, memory in
    bytes): median, min, max, rounds, the ratio to its group's baseline and, in a step group, to
    the torch-backend HVAE step and the peak memory's ratio to the VAE's; in a floor group, to the
    same method's GEMM floor, eager peer and compiled peer."""
    out = []
    for grp, benches in sorted(groups(data).items(), key=lambda kv: _group_sort_key(kv[0])):
        torch_step = benches.get("hvae-torch")
        for name in sorted(benches, key=_order):
            b, ei, base = benches[name], benches[name].get("extra_info", {}), benches.get(_baseline_name(grp, name))
            st = b["stats"]
            row = {"group": grp, "name": name, "median_s": _median(b), "min_s": st["min"], "max_s": st["max"],
                   "rounds": st["rounds"], "baseline": _baseline_name(grp, name),
                   "ratio_to_baseline": _median(b) / _median(base) if base else None}
            if grp.startswith("step-"):
                bmem = (base or {}).get("extra_info", {}).get("peak_mem_bytes")
                row.update(ratio_to_hvae_torch=_median(b) / _median(torch_step) if torch_step else None,
                           peak_mem_bytes=ei.get("peak_mem_bytes"), peak_rss_bytes=ei.get("peak_rss_bytes"),
                           mem_ratio_to_vae=ei["peak_mem_bytes"] / bmem if ei.get("peak_mem_bytes") and bmem else None,
                           batch=ei.get("batch"))
            if grp.startswith("floor-"):
                refs = _floor_refs(name, benches)
                row.update({f"ratio_to_{k}": _median(b) / r if r else None
                            for k, r in zip(("floor", "eager_peer", "compiled_peer"), refs)})
            out.append(row)
    return out


def write_csv(data: dict, path) -> None:
    """records(data) as a CSV file."""
    import csv

    rows = records(data)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: "" if r.get(k) is None else r[k] for k in cols} for r in rows)


def _status(ok) -> str:
    return "**MET**" if ok else "**NOT MET**"


def targets(data: dict) -> list:
    gpu = _is_gpu(data)
    g = groups(data)
    status = data.get("hvae_fast", {}).get("backend_status", {})
    out = ["### Targets", ""]

    def unavailable():
        why = [f"{n}: {status[n][1]}" for n in FUSED if n in status and not status[n][0]]
        return "; ".join(why) or "no fused backend in this run"

    # CPU: the auto HVAE step <= 1.0x the torch-backend HVAE step, on both step presets.
    for grp in (MNIST_GROUP, CIFAR_GROUP):
        label = (f"CPU: `auto` HVAE step (K=5) <= {CPU_STEP_TARGET}x the torch-backend HVAE step "
                 f"({grp.removeprefix('step-')})")
        if gpu:
            out.append(f"- {label}: not applicable (GPU run)")
            continue
        steps = g.get(grp, {})
        ref, auto = steps.get("hvae-torch"), steps.get("hvae-auto")
        if not ref or not auto:
            out.append(f"- {label}: not measured (no {'hvae-torch' if not ref else 'hvae-auto'} result)")
            continue
        r = _median(auto) / _median(ref)
        spread = ""
        if all(k in b["stats"] for b in (auto, ref) for k in ("min", "max")):
            # a ratio this close to the target is read against the rounds' spread, which the verdict ignores
            rng = [f"{_fmt_ms(b['stats']['min'])}-{_fmt_ms(b['stats']['max'])}" for b in (auto, ref)]
            overlap = max(auto["stats"]["min"], ref["stats"]["min"]) <= min(auto["stats"]["max"], ref["stats"]["max"])
            spread = f"; rounds {rng[0]} vs {rng[1]} ms{', overlapping' if overlap else ''}"
        out.append(f"- {label}: `hvae-auto` at {r:.3f}x of `hvae-torch` ({_fmt_ms(_median(auto))} vs "
                   f"{_fmt_ms(_median(ref))} ms{spread}): {_status(r <= CPU_STEP_TARGET)}")
        for n in sorted(n for n in steps if n.removeprefix("hvae-") in FUSED):
            out.append(f"  - `{n}` (for information): {_median(steps[n]) / _median(ref):.2f}x of `hvae-torch`")

    # Each fused op, forward + backward, <= 1.0x eager PyTorch at every size.
    label = f"{'GPU' if gpu else 'CPU'}: each fused op (forward + backward) <= {OP_TARGET}x eager PyTorch at every size"
    rows = []
    for grp, benches in sorted(g.items()):
        ref = benches.get("torch")
        if not (grp.startswith("op-") and "-fwdbwd-" in grp and ref):
            continue
        for n in sorted(n for n in benches if n in FUSED):
            r = _median(benches[n]) / _median(ref)
            rows.append(f"  - `{n}` {grp.removeprefix('op-')}: {r:.2f}x: {_status(r <= OP_TARGET)}")
    out.append(f"- {label}:" + ("" if rows else f" not measured ({unavailable()})"))
    out += rows

    # GPU: fused ops >= 70% of memory bandwidth at the large sizes.
    label = f"GPU: fused ops >= {GPU_BW_TARGET:.0%} of memory bandwidth at large sizes"
    if not gpu:
        out.append(f"- {label}: not applicable (CPU run)")
    else:
        bwi = data.get("hvae_fast", {}).get("gpu_bandwidth") or {}
        ref_txt = ""
        if bwi:
            ref_txt = (f" (reference: {bwi.get('reference')}, {bwi.get('reference_Bps', 0) / 1e9:.0f} GB/s; "
                       f"measured copy {bwi.get('copy_Bps', 0) / 1e9:.0f} GB/s)")
        rows = []
        for grp, benches in sorted(g.items()):
            for n, b in benches.items():
                ei = b.get("extra_info", {})
                if grp.startswith("op-") and n in FUSED and ei.get("large") and ei.get("bandwidth_frac") is not None:
                    f = ei["bandwidth_frac"]
                    rows.append(f"  - `{n}` {grp.removeprefix('op-')}: {ei['bandwidth_Bps'] / 1e9:.0f} GB/s = "
                                f"{100 * f:.0f}%: {_status(f >= GPU_BW_TARGET)}")
        out.append(f"- {label}{ref_txt}:" + ("" if rows else f" not measured ({unavailable()})"))
        out += rows

    # GPU: CIFAR-10 4-layer HVAE step <= 1.3x time and <= 1.25x peak memory of the VAE step.
    label = (f"GPU: CIFAR-10 4-layer HVAE step <= {GPU_STEP_TIME_TARGET}x the VAE step in time, "
             f"<= {GPU_STEP_MEM_TARGET}x in peak memory")
    steps = g.get(CIFAR_GROUP, {})
    vae = steps.get("vae")
    hv = [n for n in steps if n.startswith("hvae-")]
    lines = []
    if vae:
        for n in sorted(hv, key=_order):
            rt = _median(steps[n]) / _median(vae)
            m, mv = steps[n]["extra_info"].get("peak_mem_bytes"), vae["extra_info"].get("peak_mem_bytes")
            rm = m / mv if m and mv else None
            verdict = ""
            if gpu and n.removeprefix("hvae-") in FUSED:
                verdict = (f": time {_status(rt <= GPU_STEP_TIME_TARGET)}, "
                           f"memory {_status(rm is not None and rm <= GPU_STEP_MEM_TARGET)}")
            elif n == "hvae-torch":
                verdict = " (reference, not a target)"
            lines.append(f"  - `{n}`: time {rt:.2f}x, peak memory {_fmt_ratio(rm) or 'n/a'} of `vae`{verdict}")
    if not gpu:
        out.append(f"- {label}: not applicable (CPU run; CPU ratios for information"
                   + (f", batch {vae['extra_info'].get('batch')}" if vae else "") + ")" + (":" if lines else ""))
    else:
        fused = [n for n in hv if n.removeprefix("hvae-") in FUSED]
        out.append(f"- {label}:" + ("" if (vae and fused) else f" not measured ({'no vae result' if not vae else unavailable()})"))
    out += lines
    return out + [""]


def header(data: dict, path) -> list:
    h = data.get("hvae_fast", {})
    v = h.get("versions", {})
    lines = [f"### Benchmarks: {h.get('device_kind', '?')} ({h.get('device_name', '?')})", "",
             f"- results: `{path}`, {data.get('datetime', '?')}"
             + (f", commit {data['commit_info'].get('id', '')[:10]}" if data.get("commit_info", {}).get("id") else ""),
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "python", "hvae_fast", "cuda") if k in v)]
    if h.get("quick"):
        lines.append("- quick mode (HVAE_BENCH_QUICK=1): tiny sizes, a few rounds; it shows that every benchmark "
                     "runs, not how fast")
    if h.get("device", "").startswith("cpu"):
        lines.append(f"- CPU: {h.get('cpu_count')} cores, torch threads {h.get('torch_threads')}, "
                     f"load average {h.get('loadavg_start')} at start, {h.get('loadavg_end')} at end")
    st = h.get("backend_status", {})
    if st:
        lines.append("- backends: " + "; ".join(f"{n} {'yes' if ok else 'no'}" + ("" if ok else f" ({why})")
                                                for n, (ok, why) in st.items()))
    if h.get("torch_compile"):
        ok, why = h["torch_compile"]
        lines.append(f"- torch.compile: {'yes' if ok else 'no'} ({why})")
    return lines + [""]


def report(path) -> str:
    data = load(path)
    gpu = _is_gpu(data)
    lines = header(data, path)
    g = groups(data)
    if not g:
        lines.append("_no benchmark results in this file_")
    for grp in sorted(g, key=_group_sort_key):
        lines += floor_table(grp, g[grp]) if grp.startswith("floor-") else table(grp, g[grp], gpu)
    lines += targets(data)
    floor = floor_targets(g, gpu)
    if floor:
        lines += floor + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hvae_fast.reporting.bench", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON written by `pytest bench/ --benchmark-only`")
    ap.add_argument("--csv", metavar="FILE", help="also write the numbers behind the tables (one row per benchmark) "
                    "as CSV; one results file only")
    args = ap.parse_args(argv)
    if args.csv and len(args.results) > 1:
        print(f"error: --csv writes one file, but {len(args.results)} results files were given: pass one",
              file=sys.stderr)
        return 2
    rc = 0
    for p in args.results:
        if not Path(p).is_file():
            print(f"error: no such results file: {p} (run `pytest bench/ --benchmark-only` first)", file=sys.stderr)
            rc = 2
            continue
        try:
            print(report(p))
            if args.csv:
                write_csv(load(p), args.csv)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            print(f"error: {p} is not a bench/ results file: {type(exc).__name__}: {exc}", file=sys.stderr)
            rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
