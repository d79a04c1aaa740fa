"""`hvae-fast plot`: training curves of one or more runs side by side (ELBO, top-layer KL, active units).

Reads each run's ``metrics.jsonl``. The ELBO panel draws the unsmoothed model's training ELBO of
each logged minibatch (faint), its exponential moving average (EMA_WEIGHT per logged record) and the
validation ELBO (markers); the top-layer KL comes from the train records, the active units from
the validation records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import HVAEError

log = logging.getLogger("hvae_fast.reporting.curves")
EMA_WEIGHT = 0.9  # weight of the running average per logged record: smoothed = w * smoothed + (1 - w) * elbo


def read_records(path: Path) -> list:
    """The JSON records of a metrics.jsonl. A partial last line (a run killed mid-write) is skipped
    with a warning; a bad line before the last is an HVAEError."""
    lines = [(i + 1, line) for i, line in enumerate(path.read_text(errors="replace").splitlines()) if line.strip()]
    recs = []
    for n, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"split", "step"} <= set(rec):
                raise ValueError("not a metrics record")
        except ValueError as exc:
            if n == len(lines) - 1:
                log.warning("%s: skipping its partial last line %d (%s)", path, lineno, exc)
                break
            raise HVAEError(f"{path} line {lineno} is not a metrics record ({exc}): delete that line or rerun") from None
        recs.append(rec)
    return recs


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _plot_record_problem(rec: dict) -> str | None:
    """What keeps a metrics record from being plotted (None if nothing): its step an integer, a train
    record's elbo and top_kl numbers, a valid record's elbo a number and active_units numbers."""
    if not isinstance(rec["step"], int) or isinstance(rec["step"], bool):
        return "has a 'step' that is not an integer"
    need = {"train": ("elbo", "top_kl"), "valid": ("elbo",)}.get(rec["split"], ())
    for k in need:
        if not _number(rec.get(k)):
            return f"has no number {k!r}" if k not in rec else f"has an {k!r} that is not a number"
    au = rec.get("active_units", []) if rec["split"] == "valid" else []
    if not (isinstance(au, list) and all(map(_number, au))):
        return "has 'active_units' that are not a list of numbers"
    return None


def read_metrics(run_dir) -> tuple[str, list, list]:
    """(label, train records, valid records) of a run directory."""
    from ..config import load_config

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise HVAEError(f"{run_dir} has no metrics.jsonl: pass the --out of a `hvae-fast train` run")
    recs = read_records(path)
    for rec in recs:  # what plot_runs reads, checked before drawing: a tampered field is one line
        problem = _plot_record_problem(rec)
        if problem:
            raise HVAEError(f"{path}: the {rec['split']} record of step {str(rec['step'])[:20]} {problem}: the file is "
                            f"damaged; delete that line (or restore the file) and plot again")
    label = run_dir.name
    if (run_dir / "config.json").exists():
        cfg = load_config(run_dir / "config.json")
        label = cfg.method + (f", rho={cfg.ou.rho}, K={cfg.ou.samples}" if cfg.method == "hvae" else "")
    # A resumed run may log a step twice; the later record wins.
    dedup = lambda rs: sorted({r["step"]: r for r in rs}.values(), key=lambda r: r["step"])  # noqa: E731
    return label, dedup([r for r in recs if r["split"] == "train"]), dedup([r for r in recs if r["split"] == "valid"])


def ema(values: list, weight: float = EMA_WEIGHT) -> list:
    """Exponential moving average, bias-corrected so the first value is not pulled towards 0."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def line_labels(run_dirs, labels, defaults) -> list[str]:
    """The name of each run's lines: ``labels`` if given (one per run), else ``defaults`` (method,
    rho, K), where two runs share a default the run folder's name is added, then its path."""
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise HVAEError(f"--labels names {len(labels)} lines for {len(run_dirs)} runs: pass one label per run")
        return list(labels)
    out = list(defaults)
    for part in (lambda r: Path(r).name, str):
        dup = {lab for lab in out if out.count(lab) > 1}
        out = [f"{lab} ({part(r)})" if lab in dup else lab for r, lab in zip(run_dirs, out)]
    return out


def plot_runs(run_dirs, output: Path, labels=None) -> Path:
    """ELBO, top-layer KL and active units of each run; ``labels`` name the lines (line_labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run, *read_metrics(run)) for run in run_dirs]  # read all before drawing: errors come first
    names = line_labels(run_dirs, labels, [lab for _, lab, _, _ in runs])
    runs = [(run, lab, train, valid) for (run, _, train, valid), lab in zip(runs, names)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (run, label, train, valid) in enumerate(runs):
        c = f"C{i % 10}"
        steps = [r["step"] for r in train]
        elbo = [r["elbo"] for r in train]
        axes[0].plot(steps, elbo, color=c, alpha=0.2, lw=0.8)
        axes[0].plot(steps, ema(elbo), color=c, label=f"{label}: train (EMA {EMA_WEIGHT})")
        if valid:
            axes[0].plot([r["step"] for r in valid], [r["elbo"] for r in valid], color=c, ls="--", marker="o",
                         ms=4, label=f"{label}: validation")
        axes[1].plot(steps, [r["top_kl"] for r in train], color=c, label=label, alpha=0.8)
        if valid and "active_units" in valid[0]:
            axes[2].plot([r["step"] for r in valid], [sum(r["active_units"]) for r in valid], color=c, marker="o",
                         label=label)
    axes[0].set(title="ELBO (nats): train minibatches (faint), their EMA, validation", xlabel="step")
    axes[1].set(title="top-layer KL (nats), train", xlabel="step")
    axes[2].set(title="active units, all layers (validation)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    if len(runs) > 4:
        # many runs (a sweep): one legend beside the panels, so it does not cover the curves; the
        # top-KL panel has one line per run
        fig.legend(*axes[1].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                   ncol=1 + len(runs) // 25)
    else:
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    try:
        fig.savefig(output, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise HVAEError(f"could not write {output}: {exc.strerror or exc}; pass --output to a writable file") from None
    finally:
        plt.close(fig)
    return output
