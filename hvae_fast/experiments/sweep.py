"""`hvae-fast sweep`: many `hvae-fast train` runs as one experiment, resumable, with one results table.

A sweep is a base command (``train DATASET --steps ...``) and axes of flag values: each ``--grid``
axis multiplies the points, the ``--list`` axes are zipped into one axis of alternatives. Each
point is an ordinary run directory ``ROOT/NAME/<axis>=<value>,...``, trained by a
``python -m hvae_fast train`` subprocess and evaluated by ``eval --split valid``. The folder holds::

    sweep.json          the spec; re-running with more axis values (seeds, rho) grows the sweep and
                        keeps its finished points; any other change under the same NAME is an error
    logs/<point>.*.log  each subprocess's stdout+stderr; <point>.failed.json for a failed point
    results.csv/.json   one row per point (rebuilt from the run directories on every call)
    summary.csv/.json   mean, std (n-1), n over seeds for every other axis combination
    critical.json       the critical-rho search, when --find-critical-rho ran

A point with ``eval-valid.json`` is finished and skipped; one with ``checkpoint-latest.pt`` is
resumed with ``--resume``; a folder left before its first checkpoint is removed and restarted.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import OU_METHODS
from ..errors import HVAEError

EVAL_FILE = "eval-valid.json"
SCALARS = ("elbo", "iw_bound", "top_kl", "kl_total", "recon", "bpd")  # eval's names, copied as they are
OWNED_FLAGS = ("--out", "--resume", "--no-progress")  # the sweep sets these itself


# -- spec -------------------------------------------------------------------------------------------

def parse_axis(kind: str, text: str) -> dict:
    """``"rho=0.3,0.5"`` -> {"kind", "key", "values"}; values containing commas are separated by ';'."""
    key, sep, vals = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key or not vals.strip():
        raise HVAEError(f"--{kind} {text!r}: expected FLAG=V1,V2,... (e.g. --{kind} rho=0.5,0.9)")
    values = [v.strip() for v in vals.split(";" if ";" in vals else ",")]
    # a --list axis may repeat a value (--list hidden_sizes=200;200,200 beside distinct latent_sizes):
    # only its zipped points must differ, which make_spec checks
    if any(not v for v in values) or (kind == "grid" and len(set(values)) != len(values)):
        raise HVAEError(f"--{kind} {text!r}: values must be non-empty{' and distinct' if kind == 'grid' else ''}")
    return {"kind": kind, "key": key, "values": values}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_spec_file(path) -> dict:
    """A JSON or TOML spec: {base: "train ..." or [...], grid: {k: [v]}, list: {k: [v]}, eval_iw_samples,
    eval_max_examples, find_critical_rho: {threshold, rho_low, rho_high, iterations}}; flags given on
    the command line add axes and override the other fields."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except (OSError, ValueError) as exc:
        raise HVAEError(f"cannot read the sweep spec {path}: {exc}; pass a JSON or .toml file") from exc
    except RecursionError:
        raise HVAEError(f"cannot read the sweep spec {path}: nested too deeply; pass a JSON or .toml file") from None
    if not isinstance(d, dict):
        raise HVAEError(f"sweep spec {path}: expected an object of base, grid, list, eval_iw_samples, "
                        "eval_max_examples, find_critical_rho")
    unknown = set(d) - {"base", "grid", "list", "eval_iw_samples", "eval_max_examples", "find_critical_rho"}
    if unknown:
        raise HVAEError(f"sweep spec {path}: unknown keys {sorted(unknown)}; use base, grid, list, "
                        f"eval_iw_samples, eval_max_examples, find_critical_rho")
    problem = _spec_file_problem(d)
    if problem:
        raise HVAEError(f"sweep spec {path}: {problem}")
    return d


def _spec_file_problem(d: dict) -> str | None:
    """What is wrongly typed in a --spec file's fields, or None."""
    scalar = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    base = d.get("base", [])
    if not (isinstance(base, str) or isinstance(base, list) and all(isinstance(a, str) for a in base)):
        return "'base' must be the train command, a string or a list of strings"
    for kind in ("grid", "list"):
        axes = d.get(kind, {})
        if not (isinstance(axes, dict) and all(isinstance(v, list) and v and all(map(scalar, v))
                                               for v in axes.values())):
            return f"'{kind}' must map each flag to a non-empty list of values, e.g. {{\"seed\": [0, 1]}}"
    for key in ("eval_iw_samples", "eval_max_examples"):
        if key in d and not (isinstance(d[key], int) and not isinstance(d[key], bool)):
            return f"'{key}' must be an integer, got {d[key]!r}"
    c = d.get("find_critical_rho")
    if c is not None and not isinstance(c, dict):
        return "'find_critical_rho' must be an object of threshold, rho_low, rho_high, iterations"
    return None


def make_spec(base, axes, eval_iw_samples: int = 100, eval_max_examples: int = 0, critical: dict | None = None) -> dict:
    """Check and normalise a sweep spec (what sweep.json holds)."""
    base = list(base.split() if isinstance(base, str) else base)
    if base[:1] == ["--"]:
        base = base[1:]
    if not base or base[0] != "train":
        raise HVAEError("a sweep needs its base command after `--`, starting with train: "
                        "`hvae-fast sweep NAME --grid seed=0,1 -- train binarized-mnist --steps 5000`")
    keys = [a["key"] for a in axes]
    if len(set(keys)) != len(keys):
        raise HVAEError(f"a flag is swept twice in {keys}: give each flag one --grid or --list")
    for f in base:
        name = f.split("=")[0]
        if name in OWNED_FLAGS:
            raise HVAEError(f"the base command must not set {name}: the sweep sets it for each point")
        if name.startswith("--") and name[2:].replace("-", "_") in keys:
            raise HVAEError(f"{name} is both in the base command and swept: remove it from the base command")
    lists = [a for a in axes if a["kind"] == "list"]
    if len({len(a["values"]) for a in lists}) > 1:
        raise HVAEError("--list axes are zipped, so they need the same number of values: "
                        + ", ".join(f"{a['key']} has {len(a['values'])}" for a in lists))
    zipped = list(zip(*(a["values"] for a in lists)))
    if len(set(zipped)) != len(zipped):
        raise HVAEError("two --list alternatives are the same point: " + ", ".join(
            "/".join(map(str, z)) for z in sorted({z for z in zipped if zipped.count(z) > 1})))
    if critical is not None:
        if "rho" in keys:
            raise HVAEError("--find-critical-rho chooses rho itself: remove rho from --grid/--list")
        for k in ("threshold", "rho_low", "rho_high", "iterations"):
            v = critical.get(k)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise HVAEError(f"--find-critical-rho: {k.replace('_', '-')} must be a finite number, got {v!r}")
        if not isinstance(critical["iterations"], int) and not float(critical["iterations"]).is_integer():
            raise HVAEError(f"--find-critical-rho: iterations must be an integer, got {critical['iterations']!r}")
        if not 0 <= critical["rho_low"] < critical["rho_high"] <= 1 or critical["iterations"] < 1:
            raise HVAEError("--find-critical-rho needs 0 <= --rho-low < --rho-high <= 1 and --iterations >= 1")
    if eval_iw_samples < 0 or eval_max_examples < 0:
        raise HVAEError("--eval-iw-samples and --eval-max-examples must be >= 0 (0 = skip the IW bound / all examples)")
    return {"base": base, "axes": [dict(a) for a in axes], "eval_iw_samples": eval_iw_samples,
            "eval_max_examples": eval_max_examples, "critical": critical}


def expand(axes) -> list[dict]:
    """The points of a sweep, as {key: value string} in axis order: the product of the grid axes and
    of one axis of zipped --list alternatives (placed where the first --list axis appears)."""
    factors, list_done = [], False
    for a in axes:
        if a["kind"] == "grid":
            factors.append([[(a["key"], v)] for v in a["values"]])
        elif not list_done:
            lists = [b for b in axes if b["kind"] == "list"]
            factors.append([[(b["key"], b["values"][i]) for b in lists] for i in range(len(lists[0]["values"]))])
            list_done = True
    return [dict(pair for part in combo for pair in part) for combo in itertools.product(*factors)]


def point_name(point: dict) -> str:
    """``rho=0.5,seed=1``; a value's own commas become '-' (``latent_sizes=40-40``)."""
    return ",".join(f"{k}={v.replace(',', '-')}" for k, v in point.items()) or "base"


def typed(v: str):
    """An axis value for tables and plots: int, else float, else the string."""
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


# -- one point: train then eval ---------------------------------------------------------------------

class Point:
    """A run directory's state machine: (remove stale) -> train [--resume] -> eval -> done."""

    def __init__(self, sweep_dir: Path, values: dict, spec: dict):
        self.values, self.name = values, point_name(values)
        self.dir = sweep_dir / self.name
        self.logs = sweep_dir / "logs"
        self.spec = spec

    def finished(self) -> bool:
        try:
            json.loads((self.dir / EVAL_FILE).read_text())
            return True
        except (OSError, ValueError):  # absent, or cut short by a kill during eval
            return False

    def train_cmd(self, resume: bool = False) -> list[str]:
        pts = [a for k, v in self.values.items() for a in (flag(k), v)]
        return [sys.executable, "-m", "hvae_fast", *self.spec["base"], *pts, "--out", str(self.dir),
                "--no-progress"] + (["--resume"] if resume else [])

    def eval_cmd(self) -> list[str]:
        base = self.spec["base"]
        cmd = [sys.executable, "-m", "hvae_fast", "eval", str(self.dir), "--split", "valid",
               "--iw-samples", str(self.spec["eval_iw_samples"]), "--no-progress"]
        for opt in ("--data-dir", "--device"):  # the eval reads the same data on the same device
            if opt in base[:-1]:
                cmd += [opt, base[base.index(opt) + 1]]
        if self.spec.get("eval_max_examples"):
            cmd += ["--max-examples", str(self.spec["eval_max_examples"])]
        return cmd

    def stages(self, log) -> list[tuple[str, list[str]]]:
        """The commands left to run; removes a folder left before its first checkpoint."""
        if (self.dir / "checkpoint-latest.pt").exists():
            return [("train", self.train_cmd(resume=True)), ("eval", self.eval_cmd())]
        if self.dir.exists():
            # The trainer refuses a folder without a checkpoint; nothing in it is worth keeping.
            shutil.rmtree(self.dir)
            log(f"removed {self.dir}: it was left before its first checkpoint; restarting the point")
        return [("train", self.train_cmd()), ("eval", self.eval_cmd())]

    def failure_file(self) -> Path:
        return self.logs / f"{self.name}.failed.json"


def _die_with_parent():  # runs in the child before exec: a kill -9 of the sweep also ends its runs
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_points(points: list[Point], workers: int = 1, log=print) -> dict:
    """Run the unfinished points, ``workers`` subprocesses at a time, threads split between them.

    Single-threaded polling (no thread pool), so starting children with a pre-exec hook is safe.
    Returns {point name: "finished" | "skipped" | "failed"}.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # An OMP_NUM_THREADS the user set wins: with other work on the same cores (another sweep), an
    # OpenMP process with more threads than the cores it gets spins in its barriers and slows ~50x.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // workers))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    status = {p.name: "skipped" for p in points if p.finished()}
    pending = [p for p in points if p.name not in status]
    total, done, durations, running = len(points), len(status), [], {}
    if status:
        log(f"{len(status)}/{total} points already finished: skipped")
    preexec = _die_with_parent if sys.platform.startswith("linux") else None

    def launch(p, stages, t0):
        stage, cmd = stages.pop(0)
        p.logs.mkdir(parents=True, exist_ok=True)
        with open(p.logs / f"{p.name}.{stage}.log", "w") as out, open(p.logs / f"{p.name}.{stage}.err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=preexec)
        running[proc] = (p, stage, stages, t0)

    while pending or running:
        while pending and len(running) < workers:
            p = pending.pop(0)
            resumed = (p.dir / "checkpoint-latest.pt").exists()
            log(f"[{done + len(running) + 1}/{total}] start {p.name}" + (" (resume)" if resumed else ""))
            launch(p, p.stages(log), time.monotonic())
        time.sleep(0.1)
        for proc in [q for q in running if q.poll() is not None]:
            p, stage, stages, t0 = running.pop(proc)
            if proc.returncode == 0 and stages:
                launch(p, stages, t0)
                continue
            done += 1
            if proc.returncode != 0:
                error = _last_line(p.logs / f"{p.name}.{stage}.err")
                p.failure_file().write_text(json.dumps({"stage": stage, "returncode": proc.returncode, "error": error}) + "\n")
                status[p.name] = "failed"
                log(f"[{done}/{total}] FAILED {p.name}: {stage} exited {proc.returncode}: {error}")
                continue
            p.failure_file().unlink(missing_ok=True)
            status[p.name] = "finished"
            durations.append(time.monotonic() - t0)
            left = total - done
            eta = sum(durations) / len(durations) * math.ceil(left / workers)
            log(f"[{done}/{total}] done {p.name} in {durations[-1]:.0f} s" + (f"; ETA {_hms(eta)}" if left else ""))
    return status


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


def search_critical(sweep_dir: Path, spec: dict, workers: int, log=print) -> list[dict]:
    """The critical rho of each combination of the non-seed axes, bisecting over the seed points."""
    c = spec["critical"]
    groups = {}
    for v in expand(spec["axes"]):
        groups.setdefault(tuple((k, x) for k, x in v.items() if k != "seed"), []).append(v)
    out = []
    for key, members in groups.items():
        def measure(rho, members=members):
            pts = [Point(sweep_dir, {"rho": f"{rho:.6g}", **v}, spec) for v in members]
            run_points(pts, workers, log)
            return [json.loads((p.dir / EVAL_FILE).read_text())["top_kl"] for p in pts if p.finished()]

        res = bisect_critical(measure, c["rho_low"], c["rho_high"], c["iterations"], c["threshold"])
        res["group"] = dict(key)
        edge = " (at the end of the range: the transition may lie outside it)" if (
            res["low"] == c["rho_low"] or res["high"] == c["rho_high"]) else ""
        log(f"critical rho{' for ' + point_name(dict(key)) if key else ''} in [{res['low']:g}, {res['high']:g}]"
            f"{edge}: top KL > {c['threshold']:g} nats below, <= above; {res['runs']} runs")
        out.append(res)
    return out


# -- results ----------------------------------------------------------------------------------------

def _parse_name(name: str, spec: dict) -> dict | None:
    """{key: value string} of a run-directory name of this sweep, or None if it is not one."""
    axes = {a["key"]: a["values"] for a in spec["axes"]}
    keys = (["rho"] if spec.get("critical") else []) + list(axes)
    try:
        parts = dict(part.split("=", 1) for part in name.split(","))
    except ValueError:
        return None
    if sorted(parts) != sorted(keys):
        return None
    vals = {}
    for k in keys:
        if k == "rho" and k not in axes:
            vals[k] = parts[k]
        else:
            match = [v for v in axes[k] if v.replace(",", "-") == parts[k]]
            if not match:
                return None
            vals[k] = match[0]
    return vals


def collect_results(sweep_dir) -> list[dict]:
    """One row per point, rebuilt from the run directories: the swept flags (typed), the run's
    dataset/preset/method/rho/steps, status, and eval's figures (per-layer lists flattened as
    ``kl_layer_i`` and ``active_units_layer_i``, bottom = 1, plus ``active_units_total``)."""
    sweep_dir = Path(sweep_dir)
    spec = read_spec(sweep_dir)
    points = {} if spec.get("critical") else {point_name(v): v for v in expand(spec["axes"])}
    found = [d.name for d in sorted(sweep_dir.iterdir()) if d.is_dir()]
    found += [f.name[: -len(".failed.json")] for f in sorted((sweep_dir / "logs").glob("*.failed.json"))]
    for name in dict.fromkeys(found):  # the critical search's points, named by the rho it chose
        if name not in points and _parse_name(name, spec) is not None:
            points[name] = _parse_name(name, spec)
    rows = []
    for name, vals in points.items():
        run = sweep_dir / name
        row = {"name": name}
        if (run / "config.json").exists():
            cfg = json.loads((run / "config.json").read_text())
            ou = cfg.get("ou", {}) if cfg.get("method") in OU_METHODS else {}  # a VAE's config holds an unused rho
            row.update(dataset=cfg.get("dataset"), preset=cfg.get("preset"), method=cfg.get("method"),
                       rho=ou.get("rho"), steps=cfg.get("train", {}).get("steps"))
            if ou.get("rho_schedule", "constant") != "constant":
                row["rho_schedule"] = ou["rho_schedule"]
            if ou.get("rho_control", 0) > 0:
                row["rho_control"] = ou["rho_control"]
        row.update({k: typed(v) for k, v in vals.items()})
        failed = sweep_dir / "logs" / f"{name}.failed.json"
        try:
            ev = json.loads((run / EVAL_FILE).read_text())
        except (OSError, ValueError):
            ev = None
        if ev is not None:
            row["status"] = "finished"
            row["step"] = ev.get("step")
            row.update({k: ev[k] for k in SCALARS if k in ev})
            for i, kl in enumerate(ev.get("kl_per_layer", []), 1):
                row[f"kl_layer_{i}"] = kl
            for i, au in enumerate(ev.get("active_units", []), 1):
                row[f"active_units_layer_{i}"] = au
            if "active_units" in ev:
                row["active_units_total"] = sum(ev["active_units"])
            row["kl_per_layer"], row["active_units"] = ev.get("kl_per_layer"), ev.get("active_units")
        elif failed.exists():
            row.update(status="failed", **json.loads(failed.read_text()))
        else:
            row["status"] = "interrupted" if run.exists() else "pending"
        rows.append(row)
    return rows


def metric_columns(rows) -> list[str]:
    """The numeric eval columns of ``rows`` that a summary averages, in a stable order."""
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and (k in SCALARS or k.startswith(("kl_layer_", "active_units_layer_"))
                                  or k == "active_units_total") and isinstance(v, (int, float)):
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
    """``stem.json`` (every key) and ``stem.csv`` (scalar columns, union in order of appearance)."""
    path_stem.with_suffix(".json").write_text(json.dumps(
        [{k: _jsonable(v) for k, v in r.items()} for r in rows], indent=1) + "\n")
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in list_columns))
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if _jsonable(r.get(k)) is None else r[k] for k in cols})


def write_results(sweep_dir) -> list[dict]:
    """Rebuild results.* and summary.* from the run directories; returns the rows."""
    sweep_dir = Path(sweep_dir)
    spec = read_spec(sweep_dir)
    rows = collect_results(sweep_dir)
    axes = (["rho"] if spec.get("critical") else []) + [a["key"] for a in spec["axes"]]
    write_table(rows, sweep_dir / "results")
    write_table(summarize(rows, axes), sweep_dir / "summary")
    return rows


# -- the command -------------------------------------------------------------------------------------

def read_spec(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise HVAEError(f"{sweep_dir} is not a sweep folder (no sweep.json): pass a folder made by `hvae-fast sweep`")
    return json.loads(path.read_text())


def grows(old: dict, new: dict) -> bool:
    """Whether `new` only adds points to `old`: the same axes (keys and kinds, in order), and every old
    point among the new ones, so that every finished run directory keeps its name and its meaning."""
    shape = lambda spec: [(a["kind"], a["key"]) for a in spec["axes"]]  # noqa: E731
    if shape(old) != shape(new) or old.get("critical") or new.get("critical"):
        return False
    new_points = {point_name(v) for v in expand(new["axes"])}
    return all(point_name(v) in new_points for v in expand(old["axes"]))


def prepare(sweep_dir: Path, spec: dict) -> None:
    """Write sweep.json, or check that a re-run asks for the same sweep."""
    path = sweep_dir / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(spec)) if old.get(k) != spec.get(k)]
        if diff == ["axes"] and grows(old, spec):
            n_old, n_new = len(expand(old["axes"])), len(expand(spec["axes"]))
            print(f"sweep {sweep_dir.name}: grows from {n_old} to {n_new} points; finished points are kept", flush=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # a kill mid-write keeps the old spec
            tmp.write_text(json.dumps(spec, indent=1) + "\n")
            os.replace(tmp, path)
        elif diff:
            raise HVAEError(f"{sweep_dir} holds a sweep with another spec (differs in {', '.join(diff)}; see {path}): "
                            f"re-run it with the same arguments (or add values to its axes: more seeds, more rho), "
                            f"or give the new sweep another NAME or --root")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1) + "\n")


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
    sweep_dir = Path(args.root) / args.name
    if args.print_commands:
        if critical:
            raise HVAEError("--print-commands lists a grid, but the critical search picks each rho from the last "
                            "results: run the search here, or sweep a --grid of rho values on your scheduler")
        for v in expand(spec["axes"]):
            p = Point(sweep_dir, v, spec)
            print(f"{shlex.join(p.train_cmd())} && {shlex.join(p.eval_cmd())}")
        return 0
    prepare(sweep_dir, spec)
    log = lambda msg: print(f"sweep {args.name}: {msg}", flush=True)  # noqa: E731
    if critical:
        found = search_critical(sweep_dir, spec, args.workers, log)
        (sweep_dir / "critical.json").write_text(json.dumps(found, indent=1) + "\n")
        failed = False
    else:
        pts = [Point(sweep_dir, v, spec) for v in expand(spec["axes"])]
        failed = "failed" in run_points(pts, args.workers, log).values()
    rows = write_results(sweep_dir)
    n_failed = sum(r["status"] == "failed" for r in rows)
    log(f"{sum(r['status'] == 'finished' for r in rows)}/{len(rows)} points finished, {n_failed} failed; "
        f"wrote {sweep_dir / 'results.csv'} and {sweep_dir / 'summary.csv'}")
    return 1 if failed or n_failed else 0


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


def add_parser(sub) -> None:
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
    p.set_defaults(func=cmd_sweep)
    p.__class__ = _SweepParser  # argparse cannot hold "NAME [options] -- COMMAND..." in one positional
