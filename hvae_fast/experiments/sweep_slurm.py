"""`hvae-fast sweep ... --executor slurm`: a sweep's points as one SLURM job array, through submitit.

Each unfinished point is one array task (one SLURM task: a `torchrun` point, ``--nproc-per-point N``,
is one task whose train stage starts N processes on the GPUs of ``--slurm-gpus-per-task``); the
array runs at most ``--workers`` points at once (``%N``). A task runs the point exactly as the local
executor does (sweep.Point: the same run folder, lock checks, logs and ``.failed.json``), so the
sweep folder, its results tables, ``report`` and growing a sweep are the same on both executors.

Preemption and time limits: SLURM signals the task (USR2, ``signal_delay_s`` before the end);
submitit calls ``PointJob.checkpoint``, which stops the point's `train` with SIGTERM (the trainer
writes ``checkpoint-latest.pt`` and exits) and hands submitit a fresh PointJob to requeue, which
resumes from that checkpoint. submitit's files (the sbatch script, pickles, its own logs) go to
``SWEEP/slurm/``; ``SWEEP/slurm/jobs.json`` maps each submitted point to its job id, and a re-run is
refused while one of them is still queued or running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import HVAEError
from ..training.rundir import atomic_write_text
from .sweep_points import Point, PointBusy, _die_with_parent, _last_line, open_logs, record_failure

# SLURM job states in which a job may still start or run a point (sacct's names).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}
STOP_SECONDS = 80  # how long checkpoint() waits for the train to write its checkpoint (< signal_delay_s 90)
INTERRUPTED_CODES = (130, 143)  # train's exit after SIGINT / SIGTERM: checkpoint-latest.pt written
_SLURM_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def add_executor_args(p) -> None:
    """The sweep's --executor and --slurm-* flags."""
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: subprocesses on this machine (default); slurm: one SLURM job array through "
                        "submitit (pip install 'hvae-fast[slurm]'), --workers points at once")
    p.add_argument("--nproc-per-point", type=int, default=1, metavar="N",
                   help="processes per point: N > 1 trains each point with torchrun (one SLURM task with N processes)")
    p.add_argument("--slurm-partition", help="the partition the array runs in")
    p.add_argument("--slurm-time", type=int, default=60, metavar="MINUTES",
                   help="time limit of each point's job; a point that runs out is checkpointed and requeued (default 60)")
    p.add_argument("--slurm-gpus-per-task", type=int, metavar="N", help="GPUs of each point (its one task)")
    p.add_argument("--slurm-cpus-per-task", type=int, metavar="N", help="CPU cores of each point")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg account=abc --slurm-arg qos=high (KEY alone: a switch)")


def slurm_options(args) -> dict:
    """The sbatch parameters of ``args`` (submitit's SlurmExecutor names); HVAEError naming a bad flag."""
    if args.slurm_time < 1:
        raise HVAEError("--slurm-time must be >= 1 (minutes)")
    for name in ("slurm_gpus_per_task", "slurm_cpus_per_task"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise HVAEError(f"--{name.replace('_', '-')} must be >= 0")
    extra = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not _SLURM_KEY.fullmatch(key):
            raise HVAEError(f"--slurm-arg {item!r}: expected KEY=VALUE with an sbatch option name, e.g. account=abc")
        extra[key] = value if sep else True
    opts = {"time": args.slurm_time, "nodes": 1, "ntasks_per_node": 1, "array_parallelism": args.workers,
            "partition": args.slurm_partition, "gpus_per_task": args.slurm_gpus_per_task,
            "cpus_per_task": args.slurm_cpus_per_task, "additional_parameters": extra or None}
    return {k: v for k, v in opts.items() if v is not None}


def make_executor(folder: Path, name: str, options: dict, cluster: str = "slurm"):
    """submitit's SlurmExecutor for ``options`` (cluster "slurm"), or its LocalExecutor with the same
    time limit (cluster "local": the tests, or a machine without SLURM)."""
    try:
        import submitit
    except ImportError:
        raise HVAEError("--executor slurm needs submitit: pip install 'hvae-fast[slurm]' (or pip install submitit)") from None
    if cluster == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=options["time"], tasks_per_node=1)
        return ex
    try:
        ex = submitit.SlurmExecutor(folder)
    except RuntimeError as exc:  # no srun on this machine
        raise HVAEError(f"--executor slurm: {exc}: run the sweep on the cluster's login node, or use --executor local") from None
    try:
        ex.update_parameters(job_name=f"hvae-{name}", **options)
    except ValueError as exc:
        raise HVAEError(f"--slurm-* flags: {str(exc).splitlines()[0]}") from None
    return ex


class PointJob:
    """One point as a submitit job: runs the point's stages (sweep.Point) as subprocesses; on a
    timeout or preemption ``checkpoint`` stops the train with SIGTERM and returns a fresh PointJob to
    requeue (submitit calls any callable with a ``checkpoint`` method checkpointable)."""

    def __init__(self, sweep_dir: Path, values: dict, spec: dict):
        self.sweep_dir, self.values, self.spec = Path(sweep_dir), dict(values), spec
        self._proc = self._code = None
        self._stopping = False

    def __getstate__(self):  # a running child is not part of the job
        return {"sweep_dir": self.sweep_dir, "values": self.values, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["sweep_dir"], state["values"], state["spec"])

    def _reap(self):
        """The child's exit code once it has ended (reaped here, without Popen's lock, so that the
        signal handler and the waiting loop can both call it), else None."""
        if self._code is None and self._proc is not None:
            try:
                pid, status = os.waitpid(self._proc.pid, os.WNOHANG)
            except ChildProcessError:
                return self._code
            if pid:
                self._code = self._proc.returncode = os.waitstatus_to_exitcode(status)
        return self._code

    def __call__(self) -> dict:
        """{"status": finished | skipped | failed | busy | refused | interrupted, "message"}."""
        p = Point(self.sweep_dir, self.values, self.spec)
        if p.finished():
            return {"status": "skipped", "message": ""}
        try:
            stages = p.stages(print)
        except PointBusy as exc:
            return {"status": exc.status, "message": str(exc)}
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("OMP_NUM_THREADS")
        env = dict(os.environ, **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else {}))
        for stage, cmd in stages:
            try:
                out, err, offset = open_logs(p, stage, cmd)
            except PointBusy as exc:  # a log file that is a symbolic link: not written through
                return {"status": exc.status, "message": str(exc)}
            with out, err:
                self._proc, self._code = subprocess.Popen(cmd, stdout=out, stderr=err, env=env,
                                                          preexec_fn=_child_setup), None
            while self._reap() is None:
                time.sleep(0.2)
            if self._stopping or (stage == "train" and self._code in INTERRUPTED_CODES):
                return {"status": "interrupted", "message": f"{stage} stopped; it resumes from its checkpoint"}
            if self._code != 0:
                error = _last_line(p.logs / f"{p.name}.{stage}.err", offset)
                record_failure(p, stage, self._code, error)
                return {"status": "failed", "message": f"{stage} exited {self._code}: {error}"}
        p.failure_file().unlink(missing_ok=True)
        return {"status": "finished", "message": ""}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2 (time limit or preemption): SIGTERM the running stage, wait up to
        STOP_SECONDS for the train's checkpoint, and requeue a fresh job, which resumes from it."""
        from submitit.helpers import DelayedSubmission

        self._stopping = True
        if self._proc is not None and self._reap() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_SECONDS
            while self._reap() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return DelayedSubmission(PointJob(self.sweep_dir, self.values, self.spec))


def _child_setup():
    """In a point's stage before exec: it ignores USR2 (the job's signal to checkpoint, which
    PointJob turns into a SIGTERM), and dies with the job (Linux)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent()


def _jobs_file(sweep_dir: Path) -> Path:
    return sweep_dir / "slurm" / "jobs.json"


def read_jobs(sweep_dir: Path) -> dict:
    """{point name: job id} of the last submission, {} if none."""
    path = _jobs_file(sweep_dir)
    try:
        jobs = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        raise HVAEError(f"{path} is damaged ({str(exc)[:60]}): check `squeue --me` for this sweep's jobs, "
                        f"then delete it and re-run") from None
    if not (isinstance(jobs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in jobs.items())):
        raise HVAEError(f"{path} is damaged (not {{point: job id}}): check `squeue --me` for this sweep's jobs, "
                        f"then delete it and re-run")
    return jobs


def job_state(folder: Path, job_id: str) -> str:
    """sacct's state of a SLURM job ("UNKNOWN" when sacct does not know it)."""
    import submitit

    return submitit.SlurmJob(folder, job_id).state


def refuse_active_jobs(sweep_dir: Path, state=job_state) -> None:
    """HVAEError if a job of this sweep's last submission may still run a point: two jobs of one point
    would race for its folder."""
    jobs = read_jobs(sweep_dir)
    active = sorted({j for j in jobs.values() if state(sweep_dir / "slurm", j).split()[0] in ACTIVE_STATES})
    if active:
        raise HVAEError(f"jobs {', '.join(active)} of sweep {sweep_dir.name} are still queued or running: wait for "
                        f"them (this command then skips their finished points) or cancel them (scancel), then re-run")


def submit(sweep_dir: Path, points: list[Point], options: dict, cluster: str = "slurm") -> list:
    """Submit ``points`` as one job array (cluster "slurm": one sbatch; "local": submitit's local
    executor) and record their job ids in slurm/jobs.json; returns submitit's jobs, one per point."""
    if cluster == "slurm":
        refuse_active_jobs(sweep_dir)
    ex = make_executor(sweep_dir / "slurm", sweep_dir.name, options, cluster)
    with ex.batch():
        jobs = [ex.submit(PointJob(sweep_dir, p.values, p.spec)) for p in points]
    atomic_write_text(json.dumps({p.name: j.job_id for p, j in zip(points, jobs)}, indent=1) + "\n",
                      _jobs_file(sweep_dir))
    return jobs


def run_on_submitit(sweep_dir: Path, points: list[Point], options: dict, log=print, cluster: str = "slurm") -> dict:
    """Submit the unfinished points as one job array and wait for them; {point name: status} as
    sweep.run_points returns it. Ctrl-C stops waiting, not the jobs."""
    status = {p.name: "skipped" for p in points if p.finished()}
    if status:
        log(f"{len(status)}/{len(points)} points already finished: skipped")
    pending = [p for p in points if p.name not in status]
    if not pending:
        return status
    jobs = submit(sweep_dir, pending, options, cluster)
    array = jobs[0].job_id.split("_")[0]
    log(f"submitted {len(jobs)} points as job array {array} ({options.get('array_parallelism', 1)} at once); "
        f"submitit's logs in {sweep_dir / 'slurm'}")
    from submitit.helpers import as_completed

    point_of = {j.job_id: p for j, p in zip(jobs, pending)}
    done, total = len(status), len(points)
    try:
        for job in as_completed(jobs, poll_frequency=1 if cluster == "local" else 30):
            p, done = point_of[job.job_id], done + 1
            try:
                res = job.result()
            except Exception as exc:  # submitit: the job died, was cancelled, or timed out too often
                error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                record_failure(p, "job", -1, error)
                res = {"status": "failed", "message": f"job {job.job_id}: {error}"}
            status[p.name] = res["status"]
            log(f"[{done}/{total}] {res['status']} {p.name}" + (f": {res['message']}" if res["message"] else ""))
    except KeyboardInterrupt:
        log(f"stopped waiting; the jobs go on (array {array}): re-run this command when they have finished "
            f"(`squeue --me`), or cancel them (scancel {array})")
        for p in pending:
            status.setdefault(p.name, "queued")
    return status
