"""`hvae-fast plot`: training curves of one or more runs side by side (ELBO, top-layer KL, active units).

Reads each run's ``metrics.jsonl``; the unsmoothed training ELBO and top-layer KL are drawn from
the train records, the active units from the validation records.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import HVAEError


def read_metrics(run_dir) -> tuple[str, list, list]:
    """(label, train records, valid records) of a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise HVAEError(f"{run_dir} has no metrics.jsonl: pass the --out of a `hvae-fast train` run")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cfg_path = run_dir / "config.json"
    label = run_dir.name
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        label = cfg["method"] + (f", rho={cfg['ou']['rho']}, K={cfg['ou']['samples']}" if cfg["method"] == "hvae" else "")
    # A resumed run may log a step twice; the later record wins.
    dedup = lambda rs: list({r["step"]: r for r in rs}.values())  # noqa: E731
    return label, dedup([r for r in recs if r["split"] == "train"]), dedup([r for r in recs if r["split"] == "valid"])


def plot_runs(run_dirs, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in run_dirs:
        label, train, valid = read_metrics(run)
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["elbo"] for r in train], label=label, alpha=0.8)
        axes[1].plot(steps, [r["top_kl"] for r in train], label=label, alpha=0.8)
        if valid and "active_units" in valid[0]:
            vs = [r["step"] for r in valid]
            axes[2].plot(vs, [sum(r["active_units"]) for r in valid], marker="o", label=label)
    axes[0].set(title="unsmoothed training ELBO (nats)", xlabel="step")
    axes[1].set(title="top-layer KL (nats)", xlabel="step")
    axes[2].set(title="active units, all layers (validation)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="training curves of runs side by side (ELBO, top-layer KL, active units)")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--output", type=Path, default=Path("curves.png"))
    p.set_defaults(func=lambda args: print(f"wrote {plot_runs(args.run_dirs, args.output)}") or 0)
