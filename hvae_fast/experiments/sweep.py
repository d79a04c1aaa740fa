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
import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import HVAEError
from ..training.trainer import LOCK_NAME, atomic_write_text, run_dir_contents
from .sweep_results import (EVAL_FILE, SCALARS, collect_results, metric_columns, read_eval,  # noqa: F401
                            summarize, write_results, write_table)
from .sweep_spec import (expand, flag, grows, load_spec_file, make_spec, parse_axis, point_name,  # noqa: F401
                         read_spec, typed)

SWEEP_LOCK = ".sweep.lock"


# -- locks ------------------------------------------------------------------------------------------

def _open_lock(path: Path, create: bool) -> int | None:
    """An fd of the lock file ``path`` (never through a symlink); None if absent and not ``create``."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode(errors="replace").strip()
    return pid if pid.isdigit() else "?"


def lock_sweep_dir(sweep_dir: Path) -> int:
    """Create ``sweep_dir`` and take its SWEEP_LOCK (flock, like train's LOCK_NAME); returns the fd,
    held until the process ends. A second sweep of the same folder is refused naming the first's pid."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(sweep_dir / SWEEP_LOCK, create=True)
    except OSError as exc:
        raise HVAEError(f"cannot take the sweep lock {sweep_dir / SWEEP_LOCK}: {exc.strerror or exc}; "
                        f"pass --root to a writable folder (and remove a symlink there)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = _holder(fd)
        os.close(fd)
        raise HVAEError(f"sweep {sweep_dir.name} is already running in {sweep_dir} (process {pid}): wait for it to "
                        f"finish" + (f" or stop it (kill {pid})" if pid != "?" else "") + ", then re-run this command") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claim_run_dir(run_dir: Path):
    """Hold ``run_dir``'s train lock for the body, so no `train` starts there meanwhile; yields None,
    or the pid text of the process that holds it ('?' when the file does not say)."""
    try:
        fd = _open_lock(run_dir / LOCK_NAME, create=False)
    except OSError as exc:  # a symlink (ELOOP) or unreadable: not ours to touch
        yield f"? ({run_dir / LOCK_NAME}: {exc.strerror})"
        return
    if fd is None:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield _holder(fd)
            return
        yield None
    finally:
        os.close(fd)  # drops the flock


class PointBusy(HVAEError):
    """A point's folder is not the sweep's to run now (a process holds its lock, or it holds other files)."""


# -- one point: train then eval ---------------------------------------------------------------------

class Point:
    """A run directory's state machine: (remove stale) -> train [--resume] -> eval -> done."""

    def __init__(self, sweep_dir: Path, values: dict, spec: dict):
        self.values, self.name = values, point_name(values)
        self.dir = sweep_dir / self.name
        self.logs = sweep_dir / "logs"
        self.spec = spec

    def finished(self) -> bool:
        return read_eval(self.dir) is not None  # absent or cut short by a kill during eval: not finished

    def train_cmd(self, resume: bool = False) -> list[str]:
        # FLAG=VALUE for a value starting with '-', which argparse would otherwise read as a flag
        pts = [a for k, v in self.values.items() for a in ([f"{flag(k)}={v}"] if v.startswith("-") else [flag(k), v])]
        nproc = self.spec.get("nproc_per_point", 1)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
        return [sys.executable, *launcher, "-m", "hvae_fast", *self.spec["base"], *pts, "--out", str(self.dir),
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
        """The commands left to run; removes a folder left before its first checkpoint. PointBusy if
        a process holds the folder's train lock or the folder holds files that are not a run's."""
        with claim_run_dir(self.dir) as holder:
            if holder is not None:
                raise PointBusy(f"{self.dir} is in use by process {holder} (a `train` still running there?): left "
                                f"untouched; re-run the sweep once it has finished"
                                + (f", or stop it (kill {holder})" if holder.isdigit() else ""))
            if (self.dir / "checkpoint-latest.pt").exists():
                return [("train", self.train_cmd(resume=True)), ("eval", self.eval_cmd())]
            if self.dir.exists():
                names, run_files = run_dir_contents(self.dir)
                if self.dir.is_symlink() or set(names) - set(run_files):
                    raise PointBusy(f"{self.dir} holds files that are not a run's ({', '.join(names[:3])}): left "
                                    f"untouched; move them away and re-run the sweep")
                # The trainer refuses a folder without a checkpoint; nothing in it is worth keeping.
                shutil.rmtree(self.dir)
                log(f"removed {self.dir}: it was left before its first checkpoint; restarting the point")
        return [("train", self.train_cmd()), ("eval", self.eval_cmd())]

    def failure_file(self) -> Path:
        return self.logs / f"{self.name}.failed.json"


def _die_with_parent():  # runs in the child before exec: a kill -9 of the sweep also ends its runs
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _last_line(path: Path, offset: int = 0) -> str:
    """The last non-blank line of ``path`` from byte ``offset`` on (this attempt's part of an appended log)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def open_logs(p: Point, stage: str, cmd: list[str]):
    """(stdout file, stderr file, stderr offset) for one attempt: appended to logs/<point>.<stage>.log
    and .err under a header line, so a re-run keeps the logs of the attempts before it."""
    import shlex

    p.logs.mkdir(parents=True, exist_ok=True)
    header = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} sweep process {os.getpid()}: {shlex.join(cmd)}\n"
    out = open(p.logs / f"{p.name}.{stage}.log", "a")
    err = open(p.logs / f"{p.name}.{stage}.err", "a")
    for f in (out, err):
        f.write(header)
        f.flush()
    return out, err, err.tell()


def record_failure(p: Point, stage: str, returncode: int, error: str) -> None:
    atomic_write_text(json.dumps({"stage": stage, "returncode": returncode, "error": error}) + "\n", p.failure_file())


def run_points(points: list[Point], workers: int = 1, log=print) -> dict:
    """Run the unfinished points, ``workers`` subprocesses at a time, threads split between them.

    Single-threaded polling (no thread pool), so starting children with a pre-exec hook is safe.
    Returns {point name: "finished" | "skipped" | "failed" | "busy"}.
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
        out, err, offset = open_logs(p, stage, cmd)
        with out, err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=preexec)
        running[proc] = (p, stage, stages, t0, offset)

    while pending or running:
        while pending and len(running) < workers:
            p = pending.pop(0)
            resumed = (p.dir / "checkpoint-latest.pt").exists()
            try:
                stages = p.stages(log)
            except PointBusy as exc:
                done += 1
                status[p.name] = "busy"
                log(f"[{done}/{total}] BUSY {p.name}: {exc}")
                continue
            log(f"[{done + len(running) + 1}/{total}] start {p.name}" + (" (resume)" if resumed else ""))
            launch(p, stages, time.monotonic())
        time.sleep(0.1)
        for proc in [q for q in running if q.poll() is not None]:
            p, stage, stages, t0, offset = running.pop(proc)
            if proc.returncode == 0 and stages:
                launch(p, stages, t0)
                continue
            done += 1
            if proc.returncode != 0:
                error = _last_line(p.logs / f"{p.name}.{stage}.err", offset)
                record_failure(p, stage, proc.returncode, error)
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
    log(f"{sum(r['status'] == 'finished' for r in rows)}/{len(rows)} points finished, {n_failed} failed"
        + (f", {len(busy)} busy (left untouched: {', '.join(busy)})" if busy else "")
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
    from .sweep_slurm import add_executor_args

    add_executor_args(p)
    p.set_defaults(func=cmd_sweep)
    p.__class__ = _SweepParser  # argparse cannot hold "NAME [options] -- COMMAND..." in one positional
