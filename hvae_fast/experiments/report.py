"""`hvae-fast report SWEEP_DIR [SWEEP_DIR ...]`: the paper's figures and tables from a sweep (or
several, their rows pooled with a ``sweep`` column), as PNGs and a Markdown report.

- ``phase_transition.png`` (Fig. 1), when the sweep has two or more rho values: top-layer KL and
  total active units against rho, one line per combination of the other axes (and dataset,
  preset, method), error bars = std over seeds, the critical rho marked: the interval of
  ``critical.json`` if the sweep ran ``--find-critical-rho``, else the largest rho whose mean top
  KL is above ``--threshold``.
- ``active_units_grid.png`` (Fig. 3), when the sweep has axes ``depth`` and ``width``, or an axis
  ``latent_sizes`` (depth = its number of layers, width = its first layer's size): mean total
  active units over depth x width.
- ``rho_steering.png`` (issue 12), when some point ran ``--rho-schedule`` or ``--rho-control``: rho
  and the top-layer KL over training per group, and validation ELBO against top-layer KL for every
  group, with a table judging each steered group against the best fixed rho and fixed rho = 0.7.
- ``curves.png``: the training curves of every point (``hvae-fast plot``).
- ``report.md``: the figures, every row of the paper's Tables 3 and 4 beside this project's
  matching groups (reporting/paper_tables.py), and the summary.
- The numbers behind each table and figure, as ``NAME.csv`` and ``NAME.json`` (DATA_FILES).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..config import OU_METHODS
from ..errors import HVAEError
from ..reporting.curves import ema, plot_runs, read_metrics
from ..reporting.outputs import check_output_folder
from ..reporting.paper_tables import PAPER_ROWS, TABLE_STEPS, matches, render, run_variant
from .sweep_results import collect_results, read_critical, summarize, write_results, write_table
from .sweep_spec import read_spec

DATA_FILES = {  # what report writes beside report.md, as NAME.csv and NAME.json
    "runs": "one row per point (pooled sweeps: a sweep column): its settings and validation figures",
    "groups": "mean, std and n over seeds of each combination of the other axes (the phase, grid and steering figures, "
              "the summary table)",
    "paired": "per seed, group A minus group B of ELBO, IW bound, top-layer KL and active units, for each pair of "
              "groups on the same data and budget (A: a steered group, else the smaller rho; B: fixed rho or another method)",
    "paired_summary": "per pair of paired: mean, std and n of those differences",
    "best_fixed": "per steered run: the fixed-rho run of its method with the best validation ELBO on the same seed, and the "
                  "steered minus that run of ELBO, IW bound, top-layer KL and active units",
    "best_fixed_summary": "per steered group: mean, std and n of those differences, and on how many seeds it was ahead",
    "versus_unsmoothed": "per seed, each OU-smoothed run (fixed or steered rho) against the same model unsmoothed "
                         "(a ladder at rho 1, the VAE for the HVAE): ELBO difference, active units of the upper half "
                         "of the hierarchy and their ratio, and whether it keeps >= 2x those units at an ELBO no worse",
    "versus_unsmoothed_summary": "per smoothed group: mean, std and n of those differences, and on how many seeds it "
                                 "met that goal",
    "paper_tables": "the paper's Tables 3 and 4, every row, with this project's matching groups or 'not run'",
    "steering_curves": "per group and logged step: rho and the top-layer KL (train, mean over seeds, and its EMA)",
    "curves": "per point and logged step: the training and validation records plotted in curves.png",
}
METRICS = ("elbo", "iw_bound", "top_kl", "active_units_total", "bpd")


def _pm(row, m, fmt=".2f") -> str:
    """'mean ± std' of summary column ``m`` ('-' if absent)."""
    mean, std = row.get(f"{m}_mean"), row.get(f"{m}_std")
    if mean is None:
        return "-"
    # a std has no sign: a '+' format (signed differences) applies to the mean only
    return f"{mean:{fmt}}" + (f" ± {std:{fmt.replace('+', '')}}" if std is not None else "")


def _label(row, keys, exclude=()) -> str:
    """``k=v, ...`` of ``keys``; for a row that holds none of them (a pooled sweep without those
    axes) or when no key tells rows apart, its sweep, preset, method and rho (less ``exclude``)."""
    own = [f"{k}={row[k]}" for k in keys if k in row]
    return ", ".join(own or [f"{k}={row[k]}" for k in ("sweep", "preset", "method", "rho")
                             if k in row and k not in exclude]) or "all points"


def _varying(rows, exclude) -> list[str]:
    """The key columns whose value differs between ``rows`` (what tells their lines apart)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)  # pooled sweeps: rows differ in keys
            if k not in exclude and not k.endswith(("_mean", "_std")) and k not in ("n", "steps")]
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def largest_rho_above(points, threshold: float):
    """The largest rho whose mean top KL is above ``threshold`` (nats); ``points`` = [(rho, kl)]."""
    above = [rho for rho, kl in points if kl is not None and kl > threshold]
    return max(above) if above else None


def plot_phase(summary, critical, threshold: float, output: Path) -> tuple[Path, list[str]] | None:
    """Fig. 1 from summary rows; returns (png, Markdown lines naming the critical rho) or None."""
    rows = [r for r in summary if isinstance(r.get("rho"), (int, float)) and "top_kl_mean" in r and not steered(r)]
    if len({r["rho"] for r in rows}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _varying(rows, exclude=("rho",))
    groups = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k)) for k in keys), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    notes = []
    for i, rs in enumerate(groups.values()):
        rs = sorted(rs, key=lambda r: r["rho"])
        # a line runs over rho: its name must not be its first point's rho
        color, label = f"C{i % 10}", _label(rs[0], keys, exclude=("rho",))
        rho = [r["rho"] for r in rs]
        for ax, m in zip(axes, ("top_kl", "active_units_total")):
            ax.errorbar(rho, [r.get(f"{m}_mean", math.nan) for r in rs], yerr=[r.get(f"{m}_std") or 0 for r in rs],
                        marker="o", capsize=3, color=color, label=label)
        if not critical:
            crit = largest_rho_above([(r["rho"], r["top_kl_mean"]) for r in rs], threshold)
            if crit is not None:
                for ax in axes:
                    ax.axvline(crit, color=color, ls="--", alpha=0.6)
            notes.append(f"- {label}: largest rho with mean top-layer KL above {threshold:g} nats: "
                         + (f"**{crit:g}**" if crit is not None else "none (collapsed at every rho)"))
    for c in critical or []:
        for ax in axes:
            ax.axvspan(c["low"], c["high"], color="grey", alpha=0.25)
        name = _label(c.get("group", {}), list(c.get("group", {})))
        how = f"bisection on top-layer KL > {c['threshold']:g} nats, {c['iterations']} iterations, {c['runs']} runs"
        history = c.get("history") or []
        above = {h["top_kl_mean"] > c["threshold"] for h in history}
        # Every midpoint on one side of the threshold: the bracket is the searched range's end, not a transition.
        if len(above) == 1:
            tried = ", ".join(f"{r:g}" for r in sorted(h["rho"] for h in history))
            side, bound = (("stayed above the threshold", f"above {c['low']:g}") if above == {True}
                           else ("collapsed", f"below {c['high']:g}"))
            notes.append(f"- {name}: **no transition found**: the top layer {side} at every rho tried ({tried}); "
                         f"a critical rho, if any, lies {bound} ({how})")
        else:
            notes.append(f"- {name}: critical rho in **[{c['low']:g}, {c['high']:g}]** ({how})")
    axes[0].set(title="top-layer KL (nats, validation)", xlabel="rho")
    axes[1].set(title="active units, all layers (validation)", xlabel="rho")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output, notes


def depth_width(row):
    """(depth, width) of a row from its ``depth``/``width`` axes or its ``latent_sizes`` axis, else None."""
    if "depth" in row and "width" in row:
        return int(row["depth"]), int(row["width"])
    if "latent_sizes" in row:
        sizes = [int(s) for s in str(row["latent_sizes"]).replace("-", ",").split(",")]
        return len(sizes), sizes[0]
    return None


def grid_values(rows):
    """(depths, widths, {(depth, width): mean total active units}) of summary rows with those axes."""
    cells = {depth_width(r): r["active_units_total_mean"] for r in rows}
    return sorted({d for d, _ in cells}), sorted({w for _, w in cells}), cells


def plot_grid(summary, output: Path) -> Path | None:
    """Fig. 3: mean total active units over depth x width (coloured by the fraction active), one
    panel per other axis combination."""
    rows = [r for r in summary if depth_width(r) is not None and "active_units_total_mean" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # hidden_sizes follows depth in a Fig. 3 grid (one 200 per layer): a cell's coordinate, not a panel
    keys = _varying(rows, exclude=("depth", "width", "latent_sizes", "hidden_sizes"))
    groups = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k)) for k in keys), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, rs in zip(axes[0], groups.values()):
        depths, widths, cells = grid_values(rs)
        grid = np.array([[cells.get((d, w), np.nan) for w in widths] for d in depths])
        # colour = the fraction of units active (one 0..1 scale for every panel, as the paper's
        # figure); the text = the mean count over the total
        frac = grid / np.array([[d * w for w in widths] for d in depths])
        im = ax.imshow(frac, origin="lower", cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3g}/{depths[i] * widths[j]}", ha="center", va="center",
                        color="k" if frac[i, j] > 0.6 else "w", fontsize=8)
        ax.set(xticks=range(len(widths)), xticklabels=widths, yticks=range(len(depths)), yticklabels=depths,
               xlabel="width (units per stochastic layer)", ylabel="depth (stochastic layers)",
               title=f"active units / total: {_label(rs[0], keys)}")
        fig.colorbar(im, ax=ax, label="fraction active")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def paper_tables(rows, variants, axes, label) -> tuple[list, list]:
    """(Markdown lines, data rows) of Tables 3 and 4: each of the paper's rows, then the groups
    (mean ± std over seeds) of the finished runs that match it (paper_tables.matches), or "not run".
    ``variants``: id(row) -> run_variant of its config plus ``iw_L``, the L of its IW bound."""
    per_row = []
    for p in PAPER_ROWS:
        match = [dict(r, iw_L=variants[id(r)]["iw_L"]) for r in rows
                 if r.get("status") == "finished" and id(r) in variants and matches(p, variants[id(r)])]
        per_row.append(summarize(match, [*axes, "iw_L"]) if match else [])
    return render(per_row, label)


def summary_table(summary) -> list[str]:
    keys = _varying(summary, ()) if len(summary) > 1 else ["preset", "method"]
    cols = [m for m in METRICS if any(f"{m}_mean" in r for r in summary)]
    out = ["| " + " | ".join(keys + ["steps", "n"] + cols) + " |", "|" + " --- |" * (len(keys) + 2 + len(cols))]
    for r in summary:
        out.append("| " + " | ".join([str(r.get(k, "-")) for k in keys] + [str(r.get("steps", "-")), str(r["n"])]
                                     + [_pm(r, m) for m in cols]) + " |")
    return out


STEERING_EMA = 0.95  # weight of the running average of the steering figure's top-layer KL


def steered(row) -> bool:
    """Whether a row's rho changed during training (a --rho-schedule or a --rho-control run)."""
    return row.get("rho_schedule") not in (None, "constant") or (row.get("rho_control") or 0) > 0


def _mean_curve(trains, key):
    """(steps, mean over runs of train-record ``key`` at each step that every run logged);
    ``trains``: each run's train records."""
    per = [{r["step"]: r[key] for r in recs if isinstance(r.get(key), (int, float))} for recs in trains]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return steps, [sum(p[s] for p in per) / len(per) for s in steps]


def plot_steering(summary, rows, run_dir_of, output: Path) -> tuple[Path, list] | None:
    """Issue 12's figure, when some group steered rho: rho and the top-layer KL (train minibatches,
    EMA) over training, mean over seeds per group, and each group's validation ELBO against its
    validation top-layer KL (mean ± std over seeds): fixed rho, the VAE and the steered runs on one
    plane. Returns (png, the curves' data rows: group, step, rho, top_kl, top_kl_ema)."""
    if not any(steered(r) for r in summary):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _varying(summary, exclude=("sweep",)) or ["method"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    curves = []
    for i, g in enumerate(summary):
        color, label = f"C{i % 10}", _label(g, keys)
        members = [r for r in rows if r.get("status") == "finished" and all(str(r.get(k)) == str(g.get(k)) for k in keys)]
        # each metrics.jsonl read once; a point kept without one (its figures only) has no curve
        trains = [read_metrics(run_dir_of(r))[1] for r in members if (run_dir_of(r) / "metrics.jsonl").exists()]
        at = {}  # step -> this group's data row
        steps, rho = _mean_curve(trains, "rho")
        if steps:
            axes[0].plot(steps, rho, color=color, label=label)
        for st, v in zip(steps, rho):
            at.setdefault(st, {"group": label, "step": st})["rho"] = v
        steps, kl = _mean_curve(trains, "top_kl")
        if steps:
            axes[1].plot(steps, ema(kl, STEERING_EMA), color=color, label=label)
        for st, v, sm in zip(steps, kl, ema(kl, STEERING_EMA)):
            at.setdefault(st, {"group": label, "step": st}).update(top_kl=v, top_kl_ema=sm)
        curves += [at[st] for st in sorted(at)]
        if "elbo_mean" in g and "top_kl_mean" in g:
            axes[2].errorbar(g["top_kl_mean"], g["elbo_mean"], xerr=g.get("top_kl_std") or 0, yerr=g.get("elbo_std") or 0,
                             marker="s" if steered(g) else "o", capsize=3, color=color, label=label)
    axes[0].set(title="rho used in training (mean over seeds)", xlabel="step", ylabel="rho")
    axes[1].set(title=f"top-layer KL, training minibatches (EMA {STEERING_EMA})", xlabel="step", ylabel="nats")
    axes[2].set(title="validation: ELBO against top-layer KL", xlabel="top-layer KL (nats)", ylabel="ELBO (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[2].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, ncol=2)
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output, curves


def steering_verdict(summary, reference_rho: float = 0.7) -> list[str]:
    """Markdown: issue 12's goal for each steered group: a validation ELBO at least the best fixed
    rho's (the VAE counts as rho = 1), and the top-layer KL and active units at least half of what
    the fixed ``reference_rho`` keeps. Means over seeds; each comparison names its numbers."""
    fixed = [r for r in summary if not steered(r) and r.get("method") in ("vae", "hvae") and "elbo_mean" in r]
    ref = [r for r in fixed if r.get("method") == "hvae" and isinstance(r.get("rho"), (int, float))
           and abs(r["rho"] - reference_rho) < 1e-9]
    if not fixed or not any(steered(r) for r in summary):
        return []
    keys = _varying(summary, exclude=("sweep",)) or ["method"]
    best = max(fixed, key=lambda r: r["elbo_mean"])
    out = [f"Best fixed setting by mean validation ELBO: {_label(best, keys)} ({_pm(best, 'elbo')}, n = {best['n']})."]
    if ref:
        out.append(f"Fixed rho = {reference_rho:g} keeps top-layer KL {_pm(ref[0], 'top_kl')} nats and "
                   f"{_pm(ref[0], 'active_units_total', '.1f')} active units.")
    else:
        out.append(f"No fixed rho = {reference_rho:g} group: the activity half of the goal cannot be judged.")
    out += ["", "| steered run | n | ELBO | >= best fixed | top KL | active units | >= half of rho "
            f"{reference_rho:g}'s | goal |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in (r for r in summary if steered(r) and "elbo_mean" in r):
        elbo_ok = g["elbo_mean"] >= best["elbo_mean"]
        act_ok = None
        if ref and "top_kl_mean" in g:
            act_ok = (g["top_kl_mean"] >= 0.5 * ref[0]["top_kl_mean"]
                      and g.get("active_units_total_mean", 0) >= 0.5 * ref[0].get("active_units_total_mean", math.inf))
        verdict = "met" if elbo_ok and act_ok else "not met"
        out.append(f"| {_label(g, keys)} | {g['n']} | {_pm(g, 'elbo')} | {'yes' if elbo_ok else 'no'} | "
                   f"{_pm(g, 'top_kl')} | {_pm(g, 'active_units_total', '.1f')} | "
                   f"{'-' if act_ok is None else 'yes' if act_ok else 'no'} | {verdict} |")
    return out


PAIRED_METRICS = ("elbo", "iw_bound", "top_kl", "active_units_total", "active_units_upper_half")
UPPER_HALF_GOAL = 2.0  # issue 22.4: >= 2x the unsmoothed model's upper-half active units, at no worse ELBO


def smoothed(g) -> bool:
    """Whether a group trained OU-smoothed: every HVAE, a ladder below rho 1 or steered."""
    return g.get("method") == "hvae" or steered(g) or (g.get("rho") is not None and g["rho"] < 1)


def _pair_order(g) -> tuple:
    """Steered groups first, then fixed-rho smoothed groups by rho, then the unsmoothed ones and the
    other methods: a pair's difference is the earlier group minus the later."""
    return (0 if steered(g) else 1 if smoothed(g) else 2, g.get("rho") or 0.0)


def _diff_stats(diffs: dict) -> dict:
    """{METRIC_diff_mean, METRIC_diff_std (sample std; None for one value)} of each non-empty list
    of differences in ``diffs`` (metric -> values)."""
    out = {}
    for m, xs in diffs.items():
        if xs:
            mean = sum(xs) / len(xs)
            out[f"{m}_diff_mean"] = mean
            out[f"{m}_diff_std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return out


def seed_members(rows, keys):
    """group -> {seed: run}: the finished runs of ``rows`` that share the group's ``keys``."""
    finished = [r for r in rows if r.get("status") == "finished" and "seed" in r]
    return lambda g: {r["seed"]: r for r in finished if all(str(r.get(k)) == str(g.get(k)) for k in keys)}


def paired_differences(summary, rows, keys, label) -> tuple[list, list]:
    """(per-seed rows, per-pair rows): for each pair of groups of ``summary`` trained on the same
    data, preset and budget, and each seed both ran, A - B of PAIRED_METRICS (A before B in
    _pair_order); and per pair the mean, std and n of each difference. ``keys`` tell the groups
    apart (a run belongs to the group whose ``keys`` it shares); ``label(group)`` names one."""
    members = list(map(seed_members(rows, keys), summary))
    order = sorted(range(len(summary)), key=lambda i: _pair_order(summary[i]))
    per_seed, per_pair = [], []
    for ia, a in enumerate(order):
        for b in order[ia + 1:]:
            ga, gb = summary[a], summary[b]
            seeds = sorted(set(members[a]) & set(members[b]))
            if not seeds or any(ga.get(k) != gb.get(k) for k in ("dataset", "preset", "steps")):
                continue
            pair = {"a": label(ga), "b": label(gb)}
            diffs = {m: [] for m in PAIRED_METRICS}
            for seed in seeds:
                ra, rb = members[a][seed], members[b][seed]
                row = {**pair, "seed": seed}
                for m in PAIRED_METRICS:
                    if isinstance(ra.get(m), (int, float)) and isinstance(rb.get(m), (int, float)):
                        row.update({f"{m}_a": ra[m], f"{m}_b": rb[m], f"{m}_diff": ra[m] - rb[m]})
                        diffs[m].append(ra[m] - rb[m])
                per_seed.append(row)
            per_pair.append({**pair, "n": len(seeds), **_diff_stats(diffs)})
    return per_seed, per_pair


def versus_best_fixed(summary, rows, keys, label) -> tuple[list, list]:
    """(per-seed rows, per-steered-group rows): each steered group's run on a seed against the
    fixed-rho run of its method with the best validation ELBO on that same seed (same data, preset
    and budget), A - B of PAIRED_METRICS. Picking the best fixed rho per seed after the fact favours
    the fixed arm, so a steered run ahead of it is ahead of every fixed rho tried on that seed."""
    members = seed_members(rows, keys)

    # the fixed arms of a steered group: its own method's groups at a constant rho (a ladder's rho 1,
    # the unsmoothed ladder, included)
    fixed = [(g, members(g)) for g in summary if not steered(g) and g.get("method") in OU_METHODS]
    per_seed, per_group = [], []
    for g in (g for g in summary if steered(g)):
        same = [(f, m) for f, m in fixed if all(f.get(k) == g.get(k) for k in ("dataset", "preset", "steps", "method"))]
        diffs = {m: [] for m in PAIRED_METRICS}
        wins = 0
        for seed, ra in sorted(members(g).items()):
            arms = [(f, m[seed]) for f, m in same if seed in m and isinstance(m[seed].get("elbo"), (int, float))]
            if not isinstance(ra.get("elbo"), (int, float)) or not arms:
                continue
            fb, rb = max(arms, key=lambda a: a[1]["elbo"])
            row = {"steered": label(g), "seed": seed, "best_fixed": label(fb), "fixed_arms": len(arms)}
            for m in PAIRED_METRICS:
                if isinstance(ra.get(m), (int, float)) and isinstance(rb.get(m), (int, float)):
                    row.update({f"{m}_steered": ra[m], f"{m}_best_fixed": rb[m], f"{m}_diff": ra[m] - rb[m]})
                    diffs[m].append(ra[m] - rb[m])
            wins += row["elbo_diff"] > 0
            per_seed.append(row)
        if not diffs["elbo"]:
            continue
        per_group.append({"steered": label(g), "n": len(diffs["elbo"]), "elbo_wins": wins, **_diff_stats(diffs)})
    return per_seed, per_group


def versus_unsmoothed(summary, rows, keys, label) -> tuple[list, list]:
    """(per-seed rows, per-group rows): each smoothed group's run on a seed against the same model
    unsmoothed on that seed (same data, preset, budget; a ladder method at constant rho 1, the VAE for
    the HVAE). Per seed the ELBO difference, the upper-half active units of both and their ratio, and
    ``goal``: at least UPPER_HALF_GOAL x those units at an ELBO no worse (issue 22.4)."""
    members = seed_members(rows, keys)

    def plain_of(g):
        for p in summary:
            if smoothed(p) or any(p.get(k) != g.get(k) for k in ("dataset", "preset", "steps")):
                continue
            if p.get("method") == ("vae" if g.get("method") == "hvae" else g.get("method")):
                return p
        return None

    per_seed, per_group = [], []
    for g in sorted((g for g in summary if smoothed(g)), key=_pair_order):
        p = plain_of(g)
        if p is None:
            continue
        mg, mp = members(g), members(p)
        diffs, met = {m: [] for m in ("elbo", "active_units_upper_half")}, 0
        for seed in sorted(set(mg) & set(mp)):
            a, b = mg[seed], mp[seed]
            ua, ub = a.get("active_units_upper_half"), b.get("active_units_upper_half")
            if not all(isinstance(v, (int, float)) for v in (a.get("elbo"), b.get("elbo"), ua, ub)):
                continue
            ratio = ua / ub if ub else (math.inf if ua else 1.0)
            goal = ratio >= UPPER_HALF_GOAL and a["elbo"] >= b["elbo"]
            met += goal
            diffs["elbo"].append(a["elbo"] - b["elbo"])
            diffs["active_units_upper_half"].append(ua - ub)
            per_seed.append({"smoothed": label(g), "unsmoothed": label(p), "seed": seed, "elbo_smoothed": a["elbo"],
                             "elbo_unsmoothed": b["elbo"], "elbo_diff": a["elbo"] - b["elbo"],
                             "active_units_upper_half_smoothed": ua, "active_units_upper_half_unsmoothed": ub,
                             "active_units_upper_half_ratio": ratio, "goal": goal})
        if diffs["elbo"]:
            per_group.append({"smoothed": label(g), "unsmoothed": label(p), "n": len(diffs["elbo"]), "goal_met_on": met,
                              **_diff_stats(diffs)})
    return per_seed, per_group


def versus_unsmoothed_table(per_seed, per_group) -> list[str]:
    """Markdown of versus_unsmoothed."""
    if not per_seed:
        return []
    out = [f"Each OU-smoothed run against the same model unsmoothed, on the same seed; the goal: at least "
           f"{UPPER_HALF_GOAL:g}x the active units of the upper half of the hierarchy (the top floor(L/2) layers) at an "
           f"ELBO no worse:", "",
           "| smoothed | unsmoothed | seed | ELBO diff | upper-half active units | ratio | goal |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in per_seed:
        out.append(f"| {r['smoothed']} | {r['unsmoothed']} | {r['seed']} | {r['elbo_diff']:+.2f} | "
                   f"{r['active_units_upper_half_smoothed']:g} vs {r['active_units_upper_half_unsmoothed']:g} | "
                   f"{r['active_units_upper_half_ratio']:.2f} | {'met' if r['goal'] else 'not met'} |")
    for g in per_group:
        out.append(f"| {g['smoothed']}: mean ± std | | n = {g['n']} | {_pm(g, 'elbo_diff')} | "
                   f"{_pm(g, 'active_units_upper_half_diff', '+.1f')} more | | met on {g['goal_met_on']} of {g['n']} |")
    return out


def versus_best_fixed_table(per_seed, per_group) -> list[str]:
    """Markdown of versus_best_fixed: one line per steered run, then each group's mean."""
    if not per_seed:
        return []
    out = ["Each steered run against the fixed rho with the best validation ELBO on the same seed "
           "(chosen after the fact, which favours the fixed arm):", "",
           "| steered | seed | best fixed on that seed (of n) | ELBO steered | ELBO best fixed | ELBO diff | "
           "top KL diff | active units diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda r, m, fmt=".2f": "-" if r.get(m) is None else f"{r[m]:{fmt}}"  # noqa: E731
    for r in per_seed:
        out.append(f"| {r['steered']} | {r['seed']} | {r['best_fixed']} ({r['fixed_arms']}) | {f(r, 'elbo_steered')} | "
                   f"{f(r, 'elbo_best_fixed')} | {f(r, 'elbo_diff', '+.2f')} | {f(r, 'top_kl_diff', '+.2f')} | "
                   f"{f(r, 'active_units_total_diff', '+.1f')} |")
    for g in per_group:
        out.append(f"| {g['steered']}: mean ± std | n = {g['n']} | ahead on {g['elbo_wins']} of {g['n']} | | | "
                   f"{_pm(g, 'elbo_diff', '.2f')} | {_pm(g, 'top_kl_diff', '.2f')} | "
                   f"{_pm(g, 'active_units_total_diff', '.1f')} |")
    return out


def curve_rows(run_dirs, labels) -> list:
    """What curves.png plots, per point and logged record: split, step, ELBO, top-layer KL (train)
    and total active units (validation)."""
    out = []
    for run, label in zip(run_dirs, labels):
        _, train, valid = read_metrics(run)
        for split, recs in (("train", train), ("valid", valid)):
            for r in recs:
                row = {"run": label, "split": split, "step": r["step"], "elbo": r.get("elbo"), "top_kl": r.get("top_kl")}
                if isinstance(r.get("active_units"), list):
                    row["active_units_total"] = sum(r["active_units"])
                out.append(row)
    return out


def write_data(out: Path, tables: dict) -> list[Path]:
    """Each non-empty table of ``tables`` (name -> rows, names from DATA_FILES) as out/NAME.csv and
    out/NAME.json; returns the CSV paths."""
    written = []
    for name, table in tables.items():
        assert name in DATA_FILES, name  # every file the report writes is described there
        if table:
            write_table(table, out / name)
            written.append(out / f"{name}.csv")
    return written


def make_report(sweep_dirs, output=None, threshold: float = 1.0) -> Path:
    """Write the figures and ``report.md`` of one sweep folder, or of several side by side (their
    rows pooled, with a ``sweep`` column), into ``output`` (default FIRST_SWEEP_DIR/report)."""
    sweep_dirs = [Path(d) for d in ([sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else sweep_dirs)]
    specs = [read_spec(d) for d in sweep_dirs]  # every folder checked before anything is written
    out = Path(output) if output else sweep_dirs[0] / "report"
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, axes, run_dir, variants = [], [], {}, {}
    for d, spec in zip(sweep_dirs, specs):
        # The sweep's results tables are rebuilt where the sweep is writable; a read-only sweep is
        # only read (the report goes to --output, checked above).
        for r in (write_results(d) if os.access(d, os.W_OK) else collect_results(d)):
            if len(sweep_dirs) > 1:
                r["sweep"] = d.name
            run_dir[id(r)] = d / r["name"]
            if (d / r["name"] / "config.json").exists():  # what Tables 3/4 match on; the sweep's IW bound's L
                cfg = json.loads((d / r["name"] / "config.json").read_text())
                variants[id(r)] = {**run_variant(cfg), "iw_L": spec["eval_iw_samples"]}
            rows.append(r)
        for k in (["rho"] if spec.get("critical") else []) + [a["key"] for a in spec["axes"]]:
            if k not in axes:
                axes.append(k)
    group_axes = (["sweep"] if len(sweep_dirs) > 1 else []) + axes
    summary = summarize(rows, group_axes)
    if not summary:
        raise HVAEError(f"no point of {', '.join(map(str, sweep_dirs))} has finished (no eval-valid.json): run the "
                        f"sweep first, or re-run its command to finish it")
    critical = next((c for c in map(read_critical, sweep_dirs) if c), None)
    if critical:
        threshold = critical[0]["threshold"]
    done = [r for r in rows if r["status"] == "finished"]
    budget = ", ".join(f"{s:,}" for s in sorted({r.get("steps", r["step"]) for r in done}))
    title = ", ".join(f"`{d.name}`" for d in sweep_dirs)
    md = [f"# Sweep{'s' if len(sweep_dirs) > 1 else ''} {title}", ""]
    for d, spec in zip(sweep_dirs, specs):
        md.append(f"{'`' + d.name + '`: b' if len(sweep_dirs) > 1 else 'B'}ase command: `hvae-fast {' '.join(spec['base'])}`; "
                  "axes: " + ", ".join(f"{a['kind']} {a['key']} = {', '.join(a['values'])}" for a in spec["axes"])
                  + (" and rho by bisection" if spec.get("critical") else "")
                  + (f"; IW bound with L={spec['eval_iw_samples']}." if spec["eval_iw_samples"] else "; no IW bound."))
    md += ["", f"{len(done)}/{len(rows)} points finished; each evaluated on the validation split at its best "
           f"validation checkpoint (checkpoint-best.pt, periodic validation on a subset). "
           f"Training budget: {budget} steps (the paper: {TABLE_STEPS:,} for Tables 3-4, 100,000 for Figs. 1 and 3).", ""]
    phase = plot_phase(summary, critical, threshold, out / "phase_transition.png")
    if phase:
        md += ["## Phase transition (Fig. 1)", "", f"![phase transition]({phase[0].name})", "", *phase[1], ""]
    grid = plot_grid(summary, out / "active_units_grid.png")
    if grid:
        md += ["## Active units over depth x width (Fig. 3)", "", f"![active units grid]({grid.name})", ""]
    keys = _varying(summary, ()) or ["preset", "method"]
    label = lambda g: _label(g, keys)  # noqa: E731
    best_seed, best_group = versus_best_fixed(summary, rows, keys, label)
    steer = plot_steering(summary, done, lambda r: run_dir[id(r)], out / "rho_steering.png")
    if steer:
        md += ["## A rho that steers itself, against fixed rho", "", f"![rho steering]({steer[0].name})", "",
               *steering_verdict(summary), "", *versus_best_fixed_table(best_seed, best_group), ""]
    tables_md, tables_data = paper_tables(rows, variants, group_axes, label)
    md += ["## Tables 3 and 4: the paper beside this project", "",
           "Every row of the paper's Tables 3 and 4 (1M steps), each followed by this project's groups that train the "
           "same data, architecture, method and variant (mean ± std over seeds), or \"not run\". V. ELBO (L=100) is "
           "the IW bound with L = 100 on the validation set, the paper's column; ELBO (L=1) the single-sample ELBO. "
           "Active units are listed top to bottom (the top stochastic layer first), the order of the paper's captions.",
           "", *tables_md, "", "## Summary (mean ± std over seeds)", "", *summary_table(summary), ""]
    plotted = [r for r in done if (run_dir[id(r)] / "metrics.jsonl").exists()]
    names = [(f"{r['sweep']}/" if "sweep" in r else "") + r["name"] for r in plotted]
    if plotted:  # one line per point, named as its folder (the swept values)
        plot_runs([run_dir[id(r)] for r in plotted], out / "curves.png", labels=names)
        md += ["## Training curves", "", "![training curves](curves.png)", ""]
    per_seed, per_pair = paired_differences(summary, rows, keys, label)
    plain_seed, plain_group = versus_unsmoothed(summary, rows, keys, label)
    if plain_seed:
        md += ["## OU smoothing against the unsmoothed model", "", *versus_unsmoothed_table(plain_seed, plain_group), ""]
    data = write_data(out, {
        "runs": rows,
        "groups": summary, "paired": per_seed, "paired_summary": per_pair, "paper_tables": tables_data,
        "best_fixed": best_seed, "best_fixed_summary": best_group,
        "versus_unsmoothed": plain_seed, "versus_unsmoothed_summary": plain_group,
        "steering_curves": steer[1] if steer else [],
        "curves": curve_rows([run_dir[id(r)] for r in plotted], names)})
    if critical:
        (out / "critical.json").write_text(json.dumps(critical, indent=1) + "\n")
    md += ["## Data", "", "The numbers behind the tables and figures above, as CSV and JSON in this folder:", "",
           *[f"- `{p.stem}.csv`/`.json`: {DATA_FILES[p.stem]}" for p in data],
           *(["- `critical.json`: the critical search's interval and history"] if critical else []), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def register(sub) -> None:
    p = sub.add_parser("report", help="figures and tables of a sweep: phase transition, depth x width grid, Tables 3/4")
    p.add_argument("sweep_dir", type=Path, nargs="+", help="one sweep folder, or several reported side by side")
    p.add_argument("--output", type=Path, help="folder for the PNGs and report.md (default: the first SWEEP_DIR/report)")
    p.add_argument("--threshold", type=float, default=1.0, metavar="NATS",
                   help="top-layer KL that marks the critical rho when the sweep ran no critical search")
    p.set_defaults(func=lambda args: print(f"wrote {make_report(args.sweep_dir, args.output, args.threshold)}") or 0)
