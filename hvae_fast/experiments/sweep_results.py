"""A sweep's results, rebuilt from its folder: one row per point (results.csv/.json) and mean, std,
n over seeds (summary.csv/.json). Every file read here is checked: a damaged or tampered one is an
HVAEError naming it, never a traceback."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..config import OU_METHODS
from ..errors import HVAEError
from ..reporting.curves import read_records
from ..training.rundir import atomic_write_text
from .sweep_spec import expand, parse_point_name, point_name, read_spec, typed

EVAL_FILE = "eval-valid.json"
SCALARS = ("elbo", "iw_bound", "top_kl", "kl_total", "recon", "bpd")  # eval's names, copied as they are


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _damaged(path: Path, problem: str, fix: str) -> HVAEError:
    return HVAEError(f"{path} is damaged: {problem}; {fix}")


def read_json_file(path: Path, check, fix: str):
    """The JSON in ``path`` if ``check(value)`` returns None, else HVAEError naming the file, the
    problem ``check`` returned, and ``fix``. OSError (absent, unreadable) propagates."""
    text = Path(path).read_text()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _damaged(path, f"not JSON ({str(exc)[:80] or type(exc).__name__})", fix) from None
    problem = check(value)
    if problem:
        raise _damaged(path, problem, fix)
    return value


def _eval_problem(ev) -> str | None:
    if not isinstance(ev, dict):
        return "not a JSON object"
    for k in SCALARS:
        if k in ev and ev[k] is not None and not _num(ev[k]):
            return f"{k!r} is not a number"
    if "step" in ev and not _int(ev["step"]):
        return "'step' is not an integer"
    if "kl_per_layer" in ev and not (isinstance(ev["kl_per_layer"], list) and all(map(_num, ev["kl_per_layer"]))):
        return "'kl_per_layer' is not a list of numbers"
    if "active_units" in ev and not (isinstance(ev["active_units"], list) and all(map(_num, ev["active_units"]))):
        return "'active_units' is not a list of numbers"
    return None


def read_eval(run: Path) -> dict | None:
    """A point's eval-valid.json; None if absent or cut short (a kill during eval: the point is
    evaluated again); HVAEError if it is JSON of the wrong shape (tampered)."""
    path = run / EVAL_FILE
    try:
        text = path.read_text()
        ev = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None
    problem = _eval_problem(ev)
    if problem:
        raise _damaged(path, problem, "delete it and re-run the sweep's command to evaluate the point again")
    return ev


def _config_problem(cfg) -> str | None:
    if not isinstance(cfg, dict):
        return "not a JSON object"
    for k in ("ou", "train"):
        if not isinstance(cfg.get(k, {}), dict):
            return f"{k!r} is not an object"
    for k in ("dataset", "preset", "method"):
        if cfg.get(k) is not None and not isinstance(cfg[k], str):
            return f"{k!r} is not a string"
    ou, steps = cfg.get("ou", {}), cfg.get("train", {}).get("steps")
    if steps is not None and not _int(steps):
        return "'train.steps' is not an integer"
    for k in ("rho", "rho_control"):
        if ou.get(k) is not None and not _num(ou[k]):
            return f"'ou.{k}' is not a number"
    if not isinstance(ou.get("rho_schedule", "constant"), str):
        return "'ou.rho_schedule' is not a string"
    return None


def _failure_problem(f) -> str | None:
    if not (isinstance(f, dict) and isinstance(f.get("stage"), str) and _int(f.get("returncode"))
            and isinstance(f.get("error", ""), str)):
        return "not {stage: string, returncode: integer, error: string}"
    return None


def read_failure(path: Path) -> dict:
    """A ``logs/<point>.failed.json``: {stage, returncode, error}."""
    f = read_json_file(path, _failure_problem, "delete it (the point is then pending) and re-run the sweep's command")
    return {k: f[k] for k in ("stage", "returncode", "error") if k in f}


def _critical_problem(found) -> str | None:
    keys = ("low", "high", "threshold", "iterations", "runs")
    if not (isinstance(found, list) and found and all(
            isinstance(c, dict) and all(_num(c.get(k)) for k in keys) and isinstance(c.get("group", {}), dict)
            and isinstance(c.get("history", []), list)
            and all(isinstance(h, dict) and _num(h.get("rho")) and _num(h.get("top_kl_mean")) for h in c.get("history", []))
            for c in found)):
        return (f"not a list of {{{', '.join(keys)}: numbers, group: object, history: a list of {{rho, top_kl_mean: "
                f"numbers}}}}")
    return None


def read_critical(sweep_dir: Path) -> list | None:
    """critical.json of a sweep that ran --find-critical-rho, else None."""
    path = Path(sweep_dir) / "critical.json"
    if not path.exists():
        return None
    return read_json_file(path, _critical_problem, "delete it and re-run the sweep's command to redo the search "
                                                   "(its finished runs are kept)")


def train_seconds(run: Path) -> float | None:
    """The run's training time in seconds, validation and start-up excluded: over its logged train
    records, each one's steps since the one before divided by the rate it measured (steps_per_s).
    None without a readable metrics.jsonl or any rate. A resumed run's re-logged steps count once."""
    path = run / "metrics.jsonl"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        recs = read_records(path)
    except (HVAEError, OSError):
        return None
    rated = {r["step"]: r["steps_per_s"] for r in recs if r.get("split") == "train" and _int(r.get("step"))
             and _num(r.get("steps_per_s")) and r["steps_per_s"] > 0}
    if not rated:
        return None
    total, prev = 0.0, 0
    for step in sorted(rated):
        total += (step - prev) / rated[step]
        prev = step
    return total


def collect_results(sweep_dir) -> list[dict]:
    """One row per point, rebuilt from the run directories: the swept flags (typed), the run's
    dataset/preset/method/rho/steps, status, eval's figures (per-layer lists flattened as
    ``kl_layer_i`` and ``active_units_layer_i``, bottom = 1, plus ``active_units_total`` and
    ``active_units_upper_half``, those of the top floor(L/2) layers) and, for a finished point,
    ``train_seconds`` (see train_seconds)."""
    sweep_dir = Path(sweep_dir)
    spec = read_spec(sweep_dir)
    points = {} if spec.get("critical") else {point_name(v): v for v in expand(spec["axes"])}
    found = [d.name for d in sorted(sweep_dir.iterdir()) if d.is_dir()]
    found += [f.name[: -len(".failed.json")] for f in sorted((sweep_dir / "logs").glob("*.failed.json"))]
    for name in dict.fromkeys(found):  # the critical search's points, named by the rho it chose
        if name not in points and parse_point_name(name, spec) is not None:
            points[name] = parse_point_name(name, spec)
    rows = []
    for name, vals in points.items():
        run = sweep_dir / name
        row = {"name": name}
        if (run / "config.json").exists():
            cfg = read_json_file(run / "config.json", _config_problem,
                                 f"restore it, or remove the folder {run} to run the point again")
            ou = cfg.get("ou", {}) if cfg.get("method") in OU_METHODS else {}  # a VAE's config holds an unused rho
            row.update(dataset=cfg.get("dataset"), preset=cfg.get("preset"), method=cfg.get("method"),
                       rho=ou.get("rho"), steps=cfg.get("train", {}).get("steps"))
            if ou.get("rho_schedule", "constant") != "constant":
                row["rho_schedule"] = ou["rho_schedule"]
            if (ou.get("rho_control") or 0) > 0:
                row["rho_control"] = ou["rho_control"]
        row.update({k: typed(v) for k, v in vals.items()})
        failed = sweep_dir / "logs" / f"{name}.failed.json"
        ev = read_eval(run)
        if ev is not None:
            row["status"] = "finished"
            row["step"] = ev.get("step")
            row.update({k: ev[k] for k in SCALARS if k in ev})
            for i, kl in enumerate(ev.get("kl_per_layer", []), 1):
                row[f"kl_layer_{i}"] = kl
            for i, au in enumerate(ev.get("active_units", []), 1):
                row[f"active_units_layer_{i}"] = au
            if "active_units" in ev:
                au = ev["active_units"]
                row["active_units_total"] = sum(au)
                # issue 22's measure of collapse: the top floor(L/2) layers (layers are listed bottom first)
                row["active_units_upper_half"] = sum(au[len(au) - len(au) // 2:])
            row["kl_per_layer"], row["active_units"] = ev.get("kl_per_layer"), ev.get("active_units")
            row["train_seconds"] = train_seconds(run)
        elif failed.exists():
            row.update(status="failed", **read_failure(failed))
        else:
            row["status"] = "interrupted" if run.exists() else "pending"
        rows.append(row)
    return rows


def metric_columns(rows) -> list[str]:
    """The numeric eval columns of ``rows`` that a summary averages, in a stable order."""
    cols = []
    for r in rows:
        for k, v in r.items():
            counted = k in SCALARS or k.startswith(("kl_layer_", "active_units_layer_")) or k in (
                "active_units_total", "active_units_upper_half", "train_seconds")
            if k not in cols and counted and isinstance(v, (int, float)):
                cols.append(k)
    return cols


def summarize(rows, axes: list[str]) -> list[dict]:
    """Mean, sample std (n - 1; empty for n = 1) and n of each metric over the seeds of each
    combination of the other axes (and of dataset/preset/method/rho), finished rows only."""
    keys = [k for k in axes if k != "seed"] + [k for k in ("dataset", "preset", "method", "rho", "rho_schedule",
                                                         "rho_control") if k not in axes]
    done = [r for r in rows if r.get("status") == "finished"]
    metrics = metric_columns(done)
    groups = {}
    for r in done:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        s = {k: v for k, v in zip(keys, key) if v is not None}
        s["n"] = len(rs)
        # the training budget (config); eval's "step" is that of the checkpoint it scored (the best
        # validation ELBO's), which can be earlier
        budgets = [r.get("steps", r.get("step")) for r in rs]
        if all(isinstance(b, int) for b in budgets):
            s["steps"] = min(budgets)
        for m in metrics:
            xs = [r[m] for r in rs if isinstance(r.get(m), (int, float))]
            if xs:
                mean = sum(xs) / len(xs)
                s[f"{m}_mean"] = mean
                s[f"{m}_std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        out.append(s)
    return out


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_table(rows, path_stem: Path, list_columns=("kl_per_layer", "active_units")) -> None:
    """``stem.json`` (every key) and ``stem.csv`` (scalar columns, union in order of appearance),
    each written atomically."""
    atomic_write_text(json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows], indent=1) + "\n",
                      path_stem.with_suffix(".json"))
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in list_columns))
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if _jsonable(r.get(k)) is None else r[k] for k in cols})
    atomic_write_text(text.getvalue(), path_stem.with_suffix(".csv"))


def write_results(sweep_dir) -> list[dict]:
    """Rebuild results.* and summary.* from the run directories; returns the rows."""
    sweep_dir = Path(sweep_dir)
    spec = read_spec(sweep_dir)
    rows = collect_results(sweep_dir)
    axes = (["rho"] if spec.get("critical") else []) + [a["key"] for a in spec["axes"]]
    write_table(rows, sweep_dir / "results")
    write_table(summarize(rows, axes), sweep_dir / "summary")
    return rows
