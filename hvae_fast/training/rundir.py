"""The run folder: its lock, atomic writes, metrics appends, checkpoint reading and checking, and
``load_run``; used by the trainer, eval, sample, gradvar, spectrum and sweep.

Run directory layout::

    .train.lock              flock'ed by the one `train` process that owns the folder (holds its pid);
                             the OS releases it when that process dies, however it dies
    config.json              the full RunConfig, written once data and model are set up
    metrics.jsonl            one JSON object per logged step (train; a smoothed run's holds the step's
                             "rho") or evaluation (valid); on resume the records past the
                             checkpoint's step are dropped, so the file is an uninterrupted run's
    checkpoint-latest.pt     the state to resume from: at step 0, at the first logged step, every
                             `checkpoint_every` steps, every `checkpoint_minutes`, on SIGINT/SIGTERM
                             and at the end
    checkpoint-best.pt       the best validation ELBO so far
    samples-<step>.png       sample grids from the unsmoothed generative model
    tb/                      TensorBoard events, when tensorboard is installed (training/tracking.py)
    wandb.json, wandb/       with --wandb: the W&B run's id (a resume continues that run) and W&B's
                             own files (unless $WANDB_DIR puts them elsewhere)

Every file is written through ``atomic_write`` (``hvae_fast.fsutil.atomic_write``): a temporary
file with a unique name (tempfile, created O_EXCL, so never through a planted link) in the same
folder, fsync, rename, fsync of the folder; a crash or a full disk leaves the previous file intact
and the temporary file is removed (the next `train` in the folder removes those a dead writer left). A run file that is a symbolic
link is refused, never written through; the lock and metrics.jsonl are opened with O_NOFOLLOW.
Checkpoints hold only tensors, numbers, strings, lists and dicts, are read with
``torch.load(weights_only=True)`` and their fields' types are checked before use.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shlex
import stat
from pathlib import Path

import torch

from .. import data as data_mod
from .. import fsutil
from ..config import RunConfig, load_config
from ..errors import HVAEError
from ..fsutil import try_flock, write_pid
from ..models.model import build_model

log = logging.getLogger("hvae_fast.training.rundir")

LOCK_NAME = ".train.lock"
LATEST = "checkpoint-latest.pt"
METRICS = "metrics.jsonl"
# Also in every checkpoint: "rho_control", the RhoController's state (None without --rho-control).
CHECKPOINT_KEYS = ("step", "model", "optimizer", "scheduler", "stream", "rng_cpu", "skipped", "best_valid", "config")
# Files a `train` run writes before its first checkpoint-latest.pt: a folder holding any of them is
# the remains of an earlier attempt, never a fresh --out.
RUN_FILES = ("config.json", METRICS, "checkpoint-best.pt", "tb", "wandb.json", "wandb")
# Fields that may differ between a run's saved config and a resume request.
RESUMABLE_CHANGES = {("train", "steps"), ("device",), ("ou", "backend"), ("train", "eval_every"),
                     ("train", "log_every"), ("train", "checkpoint_every"), ("train", "sample_every"),
                     ("train", "checkpoint_minutes"), ("train", "compile"), ("train", "wandb"),
                     ("train", "wandb_group")}
# The temporary names atomic_write gives the files the project writes in a run folder.
_TEMP = re.compile(r"\.(checkpoint-\w+\.pt|config\.json|wandb\.json|samples-[\w-]+\.png|eval-\w+\.json)\.tmp-\w+")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HVAEError("--device cuda was asked for but torch sees no CUDA device: pass --device cpu (or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise HVAEError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


# -- writing -----------------------------------------------------------------------------------

class WriteFailed(HVAEError):
    """A file could not be written (``errno``: the OSError's); the old file, if any, is as it was."""

    def __init__(self, path: Path, exc: OSError, kept: bool = True):
        self.path, self.errno, self.reason = Path(path), exc.errno, exc.strerror or str(exc)
        self.kept = kept
        super().__init__(self.advise("and run again"))

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)

    def advise(self, then: str, elsewhere: str = "") -> str:
        """The one-line message: what failed, then "free disk space{elsewhere} {then}" (or "fix the folder")."""
        fix = f"free disk space{elsewhere}" if self.disk_full else "fix the folder"
        kept = f"; {self.path.name} was left as it was" if self.kept else ""
        return f"cannot write {self.path}: {self.reason}{kept}: {fix} {then}"


def refuse_link(path: Path) -> None:
    """HVAEError if ``path`` is a symbolic link: the project never writes through one."""
    if os.path.islink(path):
        raise HVAEError(f"{path} is a symbolic link (to {os.readlink(path)}); hvae-fast never writes through "
                        f"one: remove the link (rm {shlex.quote(str(path))}) and run again")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch's zip writer turns a failed write into a RuntimeError whose
    context is the OSError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(path, write) -> None:
    """``fsutil.atomic_write`` of a run or sweep file: a symbolic link at ``path`` is refused, and an
    OSError (also one inside torch.save) becomes WriteFailed, the old file kept."""
    path = Path(path)
    refuse_link(path)
    try:
        fsutil.atomic_write(path, write)
    except BaseException as exc:
        err = _os_error(exc)
        if err is None:
            raise
        raise WriteFailed(path, err) from None


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _open_nofollow(path: Path, flags: int):
    """os.open(path, flags | O_NOFOLLOW | O_CREAT) of a regular file; HVAEError for a link or other file."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_link(path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HVAEError(f"{path} is not a regular file: remove it and run again")
    return fd


def append_metrics(out: Path, record: dict) -> None:
    """Append ``record`` as one JSON line to out/metrics.jsonl (never through a link)."""
    path = Path(out) / METRICS
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteFailed(path, exc, kept=False) from None


def trim_metrics(out: Path, step: int) -> int:
    """Drop the records of out/metrics.jsonl past ``step`` (logged after the checkpoint a run resumes
    from, so logged again) and a torn last line; returns how many lines were dropped."""
    path = Path(out) / METRICS
    refuse_link(path)
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue  # a write cut short by a kill
            rec = None  # damaged in the middle: kept as found
        s = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(s, int) and s > step:
            continue
        keep.append(line if line.endswith(b"\n") else line + b"\n")
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write(b"".join(keep)))
    return len(lines) - len(keep)


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """images [N, C, H, W] in [0, 1] (or [-1, 1] for RGB) -> one grid [C, H', W'] in [0, 1] on the CPU,
    ``nrow`` images a row with 2-pixel white borders."""
    x = images.detach().float().cpu()
    if x.min() < 0:
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.ones(c, nrows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    return grid


def save_grid(grid: torch.Tensor, path) -> None:
    """An image_grid [C, H, W] as a PNG at ``path`` (str or Path), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    c, arr = grid.shape[0], grid.permute(1, 2, 0).numpy()
    gray = dict(cmap="gray", vmin=0, vmax=1) if c == 1 else {}
    atomic_write(path, lambda f: mpimg.imsave(f, arr[:, :, 0] if c == 1 else arr, format="png", **gray))


def save_image_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """images [N, C, H, W] in [0, 1] (or [-1, 1] for RGB) -> one PNG grid at ``path`` (str or Path), atomically."""
    save_grid(image_grid(images, nrow), path)


# -- the folder ----------------------------------------------------------------------------------

def _is_temp(name: str) -> bool:
    return _TEMP.fullmatch(name) is not None


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.startswith(("checkpoint-", "samples-", "eval-"))


def run_dir_contents(out: Path) -> tuple:
    """(names, run_files) of folder ``out``: its entries but the lock and temporary files, and those
    of them that a `train` run writes."""
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not _is_temp(p.name)) if out.is_dir() else []
    return names, [n for n in names if n in RUN_FILES or n == LATEST or n.startswith("samples-")]


def lock_run_dir(out: Path):
    """Create ``out`` and take the exclusive lock of its LOCK_NAME; returns the open lock file.

    A folder with other files and none of a run is refused before anything is written into it, and
    so is one whose lock or run files are symbolic links."""
    names, run_files = run_dir_contents(out)
    if names and not run_files:
        raise HVAEError(f"--out {out} is not a run directory and not empty (it holds {', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}): pass --out to a new or empty folder")
    for name in [LOCK_NAME] + [n for n in names if _is_run_file(n)]:
        refuse_link(out / name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(_open_nofollow(out / LOCK_NAME, os.O_RDWR), "r+")
    except OSError as exc:
        raise HVAEError(f"cannot write to the output directory {out}: {exc.strerror}; "
                        f"pass --out to a writable folder") from exc
    pid = try_flock(f.fileno())
    if pid is not None:
        f.close()
        who = f"process {pid}" if pid.isdigit() else "another process"
        raise HVAEError(f"{out} is in use by another `hvae-fast train` ({who}): wait for it to finish or stop it"
                        + (f" (kill {pid})" if pid.isdigit() else "") + ", or pass a different --out")
    write_pid(f.fileno())
    # We own the folder: temporary files in it are left over from a writer that died.
    for stale in [p for p in out.iterdir() if _is_temp(p.name)]:
        log.info("removing %s, left by an interrupted write", stale)
        stale.unlink(missing_ok=True)
    return f


# -- checkpoints ---------------------------------------------------------------------------------

def _count(v, lo: int = 0) -> bool:
    return type(v) is int and lo <= v < 2**63


def _rng_state(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.shape == torch.get_rng_state().shape


def _weights(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


# The type of every field a checkpoint may hold: (check, what the field must be).
FIELD_TYPES = {
    "step": (_count, "an integer >= 0"),
    "skipped": (_count, "an integer >= 0"),
    "world_size": (lambda v: _count(v, 1), "an integer >= 1"),
    "best_valid": (lambda v: type(v) in (int, float) and not math.isnan(v), "a number"),
    "model": (_weights, "a dict of tensors"),
    "optimizer": (lambda v: isinstance(v, dict), "a dict"),
    "scheduler": (lambda v: isinstance(v, dict), "a dict"),
    "stream": (lambda v: isinstance(v, dict), "a dict"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
    "rng_cpu": (_rng_state, f"torch's CPU RNG state (a uint8 tensor of {torch.get_rng_state().numel()} bytes)"),
}


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_checkpoint(path: Path, st: dict) -> None:
    """HVAEError naming the first field of ``st`` (a loaded checkpoint) of the wrong type, or its
    NaN/inf weights."""
    def bad(key, what, value):
        raise HVAEError(f"checkpoint {path}: {key!r} is {_describe(value)}, not {what}; the file is damaged or not "
                        f"written by `hvae-fast train`: use another checkpoint or start a new --out")

    for key, (ok, what) in FIELD_TYPES.items():
        if key in st and not ok(st[key]):
            bad(key, what, st[key])
    ranks = st.get("ranks")
    if ranks is not None:
        n = st.get("world_size", 1)
        if not (isinstance(ranks, list) and len(ranks) == n and all(isinstance(r, dict) for r in ranks)):
            bad("ranks", f"a list of {n} dicts (one per process)", ranks)
        for r in ranks:
            if not _rng_state(r.get("rng_cpu")) or not isinstance(r.get("stream"), dict):
                bad("ranks", "per-process RNG and data-stream states", r.get("rng_cpu"))
    for name, t in st.get("model", {}).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HVAEError(f"checkpoint {path} holds NaN/inf weights ({name}): `hvae-fast train` never writes "
                            f"those, so the file is damaged: use another checkpoint or start a new --out")


def load_checkpoint(path: Path, device, keys=CHECKPOINT_KEYS) -> dict:
    """The dict saved at ``path``, read with weights_only=True; HVAEError if unreadable, lacking one
    of ``keys`` or holding a field of the wrong type (check_checkpoint)."""
    import pickle

    try:
        st = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; quote only what the file asked for.
        what = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = what.group(1) if what else "unpickling failed"
        raise HVAEError(f"refusing to load {path}: it holds objects other than tensors, numbers and strings ({what}); "
                        f"hvae-fast never writes those, so the file is not a trusted checkpoint: delete it and use "
                        f"one written by `hvae-fast train`") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HVAEError(f"cannot read checkpoint {path}: {first}; it may be truncated: restore it "
                        f"or start a new --out") from None
    if not isinstance(st, dict):
        raise HVAEError(f"{path} holds a {type(st).__name__}, not a checkpoint dict: "
                        f"pass a checkpoint written by `hvae-fast train`")
    for k in keys:
        if k not in st:
            raise HVAEError(f"checkpoint {path} has no {k!r} entry: it is incomplete or from another program; "
                            f"use a checkpoint-latest.pt written by `hvae-fast train` or start a new --out")
    check_checkpoint(path, st)
    return st


def load_run(run_dir: Path, device: str = "auto", which: str = "best"):
    """(config, model in eval mode, device, step) of a run directory, from checkpoint-best.pt (or -latest)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise HVAEError(f"{run_dir} is not a run directory (no config.json): pass the --out of a `hvae-fast train` run")
    cfg = load_config(cfg_path)
    ckpt = run_dir / f"checkpoint-{which}.pt"
    if not ckpt.exists():
        ckpt = run_dir / LATEST
    if not ckpt.exists():
        raise HVAEError(f"no checkpoint in {run_dir}: train first, or wait for the first checkpoint")
    dev = resolve_device(device)
    model = build_model(cfg.method, cfg.model, data_mod.image_shape(cfg.dataset)).to(dev)
    st = load_checkpoint(ckpt, dev, keys=("model",))
    try:
        model.load_state_dict(st["model"])
    except RuntimeError as exc:
        raise HVAEError(f"{ckpt} does not match the model in {cfg_path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return cfg, model, dev, st.get("step", 0)


def config_diff(a: dict, b: dict, prefix=()) -> list:
    """Paths (tuples of keys) at which two nested config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, prefix + (k,))
        elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            out.append(prefix + (k,))
    return out


def check_run_dir(out: Path, cfg: RunConfig, world_size: int, resume: bool, device):
    """Refuse a (locked) folder that is not ours to write; on resume, the checkpoint whose config
    matches ``cfg`` (else None for a new run)."""
    ckpt = out / LATEST
    _, run_files = run_dir_contents(out)
    if not ckpt.exists():
        if run_files:
            raise HVAEError(f"{out} holds an attempt that stopped before its first checkpoint "
                            f"({', '.join(run_files)}, no {LATEST}): nothing to resume; remove it "
                            f"(rm -r {shlex.quote(str(out))}) and train again, or pass a new --out")
        if resume:
            raise HVAEError(f"--resume: no {LATEST} in {out}; start without --resume or pass the run's --out")
        return None
    if not resume:
        raise HVAEError(f"{out} already holds a run ({LATEST}): pass --resume to continue it, or --out for a new run")
    st = load_checkpoint(ckpt, device)
    saved = st.get("world_size", 1)
    if saved != world_size:
        how = (f"under `torchrun --nproc_per_node {saved}` (or any launch of {saved} processes)" if saved > 1
               else "in one process, without torchrun")
        raise HVAEError(f"--resume: {LATEST} in {out} was written by {saved} process(es) and this "
                        f"run has {world_size}; its data order and noise depend on that: resume it {how}")
    if cfg.train.steps < st["step"]:
        raise HVAEError(f"--resume: {out} is at step {st['step']}, past --steps {cfg.train.steps}: pass --steps "
                        f"{st['step']} or more to continue it (or a new --out for a shorter run)")
    # A checkpoint written before a config field existed lacks it: compare with that field's default.
    saved = RunConfig.from_dict(st["config"], where=f"the config inside {ckpt}").to_dict()
    diff = [p for p in config_diff(saved, cfg.to_dict()) if p not in RESUMABLE_CHANGES]
    if diff:
        names = ", ".join(".".join(p) for p in diff)
        raise HVAEError(f"--resume: the config differs from the checkpoint's in {names}; "
                        f"resume with the run's own settings (see {out / 'config.json'}) or start a new --out")
    return st
