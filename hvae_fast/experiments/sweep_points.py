"""A sweep's points on this machine: the sweep's own lock, a point's run folder (claimed under its
train lock), its train and eval subprocesses and their logs, and the local pool that runs points
``--workers`` at a time (sweep.py has the command; sweep_slurm.py runs the same points on SLURM)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from ..errors import HVAEError
from ..fsutil import try_flock, write_pid
from ..training.rundir import LOCK_NAME, atomic_write_text, run_dir_contents
from .sweep_results import EVAL_FILE, read_eval  # noqa: F401 (EVAL_FILE: the finished mark)
from .sweep_spec import flag, point_name

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


def lock_sweep_dir(sweep_dir: Path) -> int:
    """Create ``sweep_dir`` and take its SWEEP_LOCK (flock, like train's LOCK_NAME); returns the fd,
    held until the process ends. A second sweep of the same folder is refused naming the first's pid."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(sweep_dir / SWEEP_LOCK, create=True)
    except OSError as exc:
        raise HVAEError(f"cannot take the sweep lock {sweep_dir / SWEEP_LOCK}: {exc.strerror or exc}; "
                        f"pass --root to a writable folder (and remove a symlink there)") from None
    pid = try_flock(fd)
    if pid is not None:
        os.close(fd)
        raise HVAEError(f"sweep {sweep_dir.name} is already running in {sweep_dir} (process {pid}): wait for it to "
                        f"finish" + (f" or stop it (kill {pid})" if pid != "?" else "") + ", then re-run this command")
    write_pid(fd)
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
        yield try_flock(fd)
    finally:
        os.close(fd)  # drops the flock


class PointBusy(HVAEError):
    """A point's folder is not the sweep's to run now: a process holds its lock (status "busy")."""

    status = "busy"


class PointRefused(PointBusy):
    """A point the sweep will not run until a person looks: its folder holds files that are not a
    run's, or its logs are symbolic links (status "refused"; re-running will not help)."""

    status = "refused"


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
        # A W&B project's sweep points go in one group named after the sweep, unless a group is given.
        given = {a.split("=")[0] for a in self.spec["base"]} | {flag(k) for k in self.values}
        if "--wandb" in given and "--wandb-group" not in given:
            pts += ["--wandb-group", self.dir.parent.name]
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
                    raise PointRefused(f"{self.dir} holds files that are not a run's ({', '.join(names[:3])}): "
                                       f"left untouched; move them away and re-run the sweep")
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


def _open_log(path: Path):
    """``path`` opened for appending, never through a symbolic link; PointBusy naming it if it is one
    (or not a regular file, or cannot be opened)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        what = "is a symbolic link" if os.path.islink(path) else f"cannot be opened ({exc.strerror or exc})"
        raise PointRefused(f"the log file {path} {what}; the sweep never writes through one: remove it "
                           f"and re-run the sweep") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PointRefused(f"the log file {path} is not a regular file: remove it and re-run the sweep")
    return os.fdopen(fd, "a")


def open_logs(p: Point, stage: str, cmd: list[str]):
    """(stdout file, stderr file, stderr offset) for one attempt: appended to logs/<point>.<stage>.log
    and .err under a header line, so a re-run keeps the logs of the attempts before it. PointRefused
    (naming the file) if ``logs`` or one of the two files is a symbolic link: none is written through."""
    import shlex

    if p.logs.is_symlink():
        raise PointRefused(f"the log folder {p.logs} is a symbolic link; the sweep never writes through one: "
                           f"remove it and re-run the sweep")
    p.logs.mkdir(parents=True, exist_ok=True)
    header = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} sweep process {os.getpid()}: {shlex.join(cmd)}\n"
    out = _open_log(p.logs / f"{p.name}.{stage}.log")
    try:
        err = _open_log(p.logs / f"{p.name}.{stage}.err")
    except BaseException:
        out.close()
        raise
    for f in (out, err):
        f.write(header)
        f.flush()
    return out, err, err.tell()


def record_failure(p: Point, stage: str, returncode: int, error: str) -> None:
    atomic_write_text(json.dumps({"stage": stage, "returncode": returncode, "error": error}) + "\n", p.failure_file())


def run_points(points: list[Point], workers: int = 1, log=print) -> dict:
    """Run the unfinished points, ``workers`` subprocesses at a time, threads split between them.

    Single-threaded polling (no thread pool), so starting children with a pre-exec hook is safe.
    Returns {point name: "finished" | "skipped" | "failed" | "busy" | "refused"}.
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

    def launch(p, stages, t0) -> bool:
        """Start the point's next stage; False (the point counted busy and named) if its logs cannot be opened."""
        nonlocal done
        stage, cmd = stages.pop(0)
        try:
            out, err, offset = open_logs(p, stage, cmd)
        except PointBusy as exc:
            done += 1
            status[p.name] = exc.status
            log(f"[{done}/{total}] {exc.status.upper()} {p.name}: {exc}")
            return False
        with out, err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=preexec)
        running[proc] = (p, stage, stages, t0, offset)
        return True

    while pending or running:
        while pending and len(running) < workers:
            p = pending.pop(0)
            resumed = (p.dir / "checkpoint-latest.pt").exists()
            try:
                stages = p.stages(log)
            except PointBusy as exc:
                done += 1
                status[p.name] = exc.status
                log(f"[{done}/{total}] {exc.status.upper()} {p.name}: {exc}")
                continue
            log(f"[{done + len(running) + 1}/{total}] start {p.name}" + (" (resume)" if resumed else ""))
            launch(p, stages, time.monotonic())  # a point whose logs are links is counted refused there
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
