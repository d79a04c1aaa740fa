"""`hvae-fast sweep`: many `hvae-fast train` runs as one experiment, resumable, with one results table.

A sweep is a base command (``train DATASET --steps ...``) and axes of flag values: each ``--grid``
axis multiplies the points, the ``--list`` axes are zipped into one axis of alternatives. Each
point is an ordinary run directory ``ROOT/NAME/<axis>=<value>,...`` (named as sweep_spec.point_name
says: always inside ROOT/NAME), trained by a ``python -m hvae_fast train`` subprocess and evaluated
by ``eval --split valid``. The folder holds::

    .sweep.lock         flock'ed by the one `sweep` process that runs this folder (holds its pid)
    sweep.json          the spec; re-running with more axis values (seeds, rho) grows the sweep and
                        keeps its finished points; any other change under the same NAME is an error
    logs/<point>.*.log  each subprocess's stdout (.log) and stderr (.err), every attempt appended
                        under a header line; <point>.failed.json for a failed point
    results.csv/.json   one row per point (rebuilt from the run directories on every call)
    summary.csv/.json   mean, std (n-1), n over seeds for every other axis combination
    critical.json       the critical-rho search, when --find-critical-rho ran

A point with ``eval-valid.json`` is finished and skipped; one with ``checkpoint-latest.pt`` is
resumed with ``--resume``; a folder left before its first checkpoint is removed and restarted. A
point whose ``.train.lock`` a process holds (a `train` still running there) is left untouched and
reported as busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import HVAEError
from ..training.rundir import atomic_write_text
# the sweep API stays importable from here (tests and scripts use sweep.Point, sweep.expand, ...)
from .sweep_points import (EVAL_FILE, SWEEP_LOCK, Point, PointBusy, PointRefused, claim_run_dir,  # noqa: F401
                           lock_sweep_dir, run_points)
from .sweep_results import (SCALARS, collect_results, metric_columns, read_eval, summarize,  # noqa: F401
                            write_results, write_table)
from .sweep_slurm import add_executor_args
from .sweep_spec import (expand, flag, grows, load_spec_file, make_spec, parse_axis, point_name,  # noqa: F401
                         read_spec, typed)


# -- critical rho ----------------------------------------------------------------------------------

def bisect_critical(measure, low: float, high: float, iterations: int, threshold: float) -> dict:
    """Bisect rho in [low, high] on the top-layer KL: ``measure(rho)`` -> top KLs (nats) over seeds.

    Above the critical rho the top layer collapses (KL ~ 0). A mean KL above ``threshold`` at the
    midpoint moves ``low`` up, else ``high`` down, so the critical rho lies in [low, high] if the
    KL is above the threshold at ``low`` and below at ``high`` (the ends are not run).
    """
    history = []
    for _ in range(iterations):
        mid = float(f"{(low + high) / 2:.6g}")  # the run-directory name is this value's string
        kls = list(measure(mid))
        if not kls:
            raise HVAEError(f"no run at rho={mid:g} finished, so the search cannot go on: see the sweep's logs/ "
                            f"folder, fix the cause and re-run the same command")
        mean = sum(kls) / len(kls)
        history.append({"rho": mid, "top_kl_mean": mean, "n": len(kls)})
        if mean > threshold:
            low = mid
        else:
            high = mid
    return {"low": low, "high": high, "threshold": threshold, "iterations": iterations,
            "runs": sum(h["n"] for h in history), "history": history}


def search_critical(sweep_dir: Path, spec: dict, workers: int, log=print, runner=None) -> list[dict]:
    """The critical rho of each combination of the non-seed axes, bisecting over the seed points;
    ``runner(points)`` runs them (default: run_points here, ``workers`` at a time)."""
    runner = runner or (lambda pts: run_points(pts, workers, log))
    c = spec["critical"]
    groups = {}
    for v in expand(spec["axes"]):
        groups.setdefault(tuple((k, x) for k, x in v.items() if k != "seed"), []).append(v)
    out = []
    for key, members in groups.items():
        def measure(rho, members=members):
            pts = [Point(sweep_dir, {"rho": f"{rho:.6g}", **v}, spec) for v in members]
            runner(pts)
            evals = [read_eval(p.dir) for p in pts]
            return [ev["top_kl"] for ev in evals if ev is not None and ev.get("top_kl") is not None]

        res = bisect_critical(measure, c["rho_low"], c["rho_high"], c["iterations"], c["threshold"])
        res["group"] = dict(key)
        edge = " (at the end of the range: the transition may lie outside it)" if (
            res["low"] == c["rho_low"] or res["high"] == c["rho_high"]) else ""
        log(f"critical rho{' for ' + point_name(dict(key)) if key else ''} in [{res['low']:g}, {res['high']:g}]"
            f"{edge}: top KL > {c['threshold']:g} nats below, <= above; {res['runs']} runs")
        out.append(res)
    return out


# -- the command -------------------------------------------------------------------------------------

def prepare(sweep_dir: Path, spec: dict) -> None:
    """Write sweep.json (atomically), or check that a re-run asks for the same sweep."""
    path = sweep_dir / "sweep.json"
    if path.exists():
        old = read_spec(sweep_dir)
        diff = [k for k in sorted(set(old) | set(spec)) if old.get(k) != spec.get(k)]
        if diff == ["axes"] and grows(old, spec):
            n_old, n_new = len(expand(old["axes"])), len(expand(spec["axes"]))
            print(f"sweep {sweep_dir.name}: grows from {n_old} to {n_new} points; finished points are kept", flush=True)
            atomic_write_text(json.dumps(spec, indent=1) + "\n", path)  # a kill mid-write keeps the old spec
        elif diff:
            raise HVAEError(f"{sweep_dir} holds a sweep with another spec (differs in {', '.join(diff)}; see {path}): "
                            f"re-run it with the same arguments (or add values to its axes: more seeds, more rho), "
                            f"or give the new sweep another NAME or --root")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(spec, indent=1) + "\n", path)  # a kill mid-write leaves no half spec


def cmd_sweep(args) -> int:
    import shlex

    d = load_spec_file(args.spec) if args.spec else {}
    axes = [parse_axis(kind, f"{k}={';'.join(map(str, vs))}") for kind in ("grid", "list")
            for k, vs in d.get(kind, {}).items()] + list(args.axes or [])
    base = args.command or d.get("base", [])
    critical = d.get("find_critical_rho")
    if args.find_critical_rho:
        if args.threshold is None:
            raise HVAEError("--find-critical-rho needs --threshold NATS (the top-layer KL that separates collapse)")
        critical = {"threshold": args.threshold, "rho_low": args.rho_low, "rho_high": args.rho_high,
                    "iterations": args.iterations}
    elif critical is not None:
        if "threshold" not in critical:
            raise HVAEError(f"{args.spec}: find_critical_rho needs a threshold (the top-layer KL in nats)")
        critical = {"rho_low": 0.0, "rho_high": 1.0, "iterations": 4, **critical}
    pick = lambda flag_value, key, default: flag_value if flag_value is not None else d.get(key, default)  # noqa: E731
    spec = make_spec(base, axes, pick(args.eval_iw_samples, "eval_iw_samples", 100),
                     pick(args.eval_max_examples, "eval_max_examples", 0), critical)
    if args.workers < 1:
        raise HVAEError("--workers must be >= 1")
    if args.nproc_per_point < 1:
        raise HVAEError("--nproc-per-point must be >= 1")
    if args.nproc_per_point > 1:  # part of the spec: a run resumes only with the processes it started with
        spec["nproc_per_point"] = args.nproc_per_point
    sweep_dir = Path(args.root) / args.name
    if args.print_commands:
        if critical:
            raise HVAEError("--print-commands lists a grid, but the critical search picks each rho from the last "
                            "results: run the search here, or sweep a --grid of rho values on your scheduler")
        for v in expand(spec["axes"]):
            p = Point(sweep_dir, v, spec)
            print(f"{shlex.join(p.train_cmd())} && {shlex.join(p.eval_cmd())}")
        return 0
    log = lambda msg: print(f"sweep {args.name}: {msg}", flush=True)  # noqa: E731
    runner = lambda pts: run_points(pts, args.workers, log)  # noqa: E731
    if args.executor == "slurm":
        from .sweep_slurm import run_on_submitit, slurm_options

        options = slurm_options(args)
        runner = lambda pts: run_on_submitit(sweep_dir, pts, options, log)  # noqa: E731
    lock = lock_sweep_dir(sweep_dir)
    try:
        prepare(sweep_dir, spec)
        if critical:
            found = search_critical(sweep_dir, spec, args.workers, log, runner)
            atomic_write_text(json.dumps(found, indent=1) + "\n", sweep_dir / "critical.json")
            status = {}
        else:
            status = runner([Point(sweep_dir, v, spec) for v in expand(spec["axes"])])
        return finish(sweep_dir, status, log)
    finally:
        os.close(lock)  # drops the flock

def finish(sweep_dir: Path, status: dict, log) -> int:
    """Rebuild the results tables and say how the sweep stands; the exit code: 1 unless every point finished."""
    rows = write_results(sweep_dir)
    n_failed = sum(r["status"] == "failed" for r in rows)
    busy = [name for name, s in status.items() if s == "busy"]
    refused = [name for name, s in status.items() if s == "refused"]
    log(f"{sum(r['status'] == 'finished' for r in rows)}/{len(rows)} points finished, {n_failed} failed"
        + (f", {len(busy)} busy (left untouched: {', '.join(busy)})" if busy else "")
        + (f", {len(refused)} refused (left untouched, see the lines above: {', '.join(refused)})" if refused else "")
        + f"; wrote {sweep_dir / 'results.csv'} and {sweep_dir / 'summary.csv'}")
    return 1 if set(status.values()) - {"finished", "skipped"} or n_failed else 0


class _SweepParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is the base command (``args.command``), flags included."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        ns, extra = super().parse_known_args(args[:cut], namespace)
        ns.command = args[cut + 1:]
        return ns, extra


def _axis_type(kind: str):
    """parse_axis as an argparse type: its error becomes argparse's one-line usage error (exit 2)."""
    def parse(text: str) -> dict:
        try:
            return parse_axis(kind, text)
        except HVAEError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def register(sub) -> None:
    p = sub.add_parser("sweep", help="many train runs (a grid of flag values) as one resumable experiment",
                       usage="hvae-fast sweep NAME [--grid FLAG=V1,V2 ...] [options] -- train DATASET [train flags]",
                       description="Run `hvae-fast train` once per point of a grid of flag values, evaluate each "
                                   "point on the validation split, and tabulate the results. Re-running the same "
                                   "command skips finished points and resumes interrupted ones.")
    p.add_argument("name", help="the sweep's name: its folder is ROOT/NAME")
    p.add_argument("--grid", dest="axes", action="append", type=_axis_type("grid"), metavar="FLAG=V1,V2",
                   help="a product axis, e.g. rho=0.3,0.5 or seed=0,1,2 (';' separates values that hold commas)")
    p.add_argument("--list", dest="axes", action="append", type=_axis_type("list"), metavar="FLAG=V1,V2",
                   help="alternatives: all --list axes are zipped into one axis (e.g. --list 'latent_sizes=40;40,40' --list 'hidden_sizes=200;200,200')")
    p.add_argument("--spec", type=Path, help="a JSON or .toml file with base, grid, list, eval_iw_samples, find_critical_rho")
    p.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="where sweep folders go (default runs/sweeps)")
    p.add_argument("--workers", type=int, default=1, help="points run at once; CPU threads are split between them "
                   "(OMP_NUM_THREADS, when set, is each point's thread count)")
    p.add_argument("--eval-iw-samples", type=int, help="L of each point's IW bound (default 100; 0 = skip)")
    p.add_argument("--eval-max-examples", type=int, help="validation examples each eval uses (default 0 = all)")
    p.add_argument("--print-commands", action="store_true", help="print each point's train && eval command line and exit")
    p.add_argument("--find-critical-rho", action="store_true", help="bisect rho on the top-layer KL instead of a rho grid")
    p.add_argument("--threshold", type=float, metavar="NATS", help="top-layer KL above which the top layer is not collapsed")
    p.add_argument("--rho-low", type=float, default=0.0)
    p.add_argument("--rho-high", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=4, help="bisection steps: the interval shrinks 2^N-fold")
    add_executor_args(p)
    p.set_defaults(func=cmd_sweep)
    p.__class__ = _SweepParser  # argparse cannot hold "NAME [options] -- COMMAND..." in one positional
