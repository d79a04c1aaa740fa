"""The `hvae-fast memory` table (Table 6) as text, CSV, JSON and a bar chart, from the rows
``hvae_fast.experiments.memory.run_table`` returns (one dict per model and depth; sizes in bytes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Table 6 of the paper: (model, layers) -> (memory in G, parameters).
PAPER = {("vae", 4): (2.12, 12.4e6), ("vae", 6): (2.45, 16.8e6), ("iwae", 4): (8.59, 12.4e6),
         ("iwae", 6): (10.5, 16.8e6), ("lvae", 15): (6.4, 59.5e6), ("biva", 15): (10.3, 103e6),
         ("hvae", 4): (3.74, 12.4e6), ("hvae", 6): (4.6, 16.8e6)}
COLUMNS = ["model", "layers", "parameters", "memory_bytes", "memory_kind", "ratio_to_vae", "saved_bytes",
           "param_bytes", "grad_bytes", "optimizer_bytes", "counted_bytes", "cpu_peak_bytes", "cpu_peak_ratio_to_vae",
           "rss_peak_bytes", "ratio_to_unsmoothed", "step_seconds",
           "paper_memory_gb", "paper_parameters", "batch_size", "samples", "backend", "device"]
CSV_COLUMNS = COLUMNS + ["paper_ratio_to_vae"]  # the CSV adds the paper's ratio to the VAE of the same depth
CPU_MEASURE = ("saved-for-backward tensors (deduplicated by storage) + parameters + gradients + optimizer state")
CPU_PEAK = ("CPU peak: the true peak of the step, torch's CPU allocator (torch.profiler memory events) over the "
            "step plus what is live at its start (parameters, buffers, optimizer state, the batch)")


def paper_ratio(row: dict) -> float | None:
    """The paper's memory for this row's model over its VAE of the same depth (Table 6), if both exist."""
    pm, vae = row.get("paper_memory_gb"), PAPER.get(("vae", row["layers"]))
    return pm / vae[0] if pm is not None and vae else None


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.3f}G"


def format_table(rows: list) -> str:
    """The table as aligned text: one line per row, sizes in GiB, ratios to the VAE of the same depth
    (and, for a smoothed ladder's "-ou" row, to the same ladder unsmoothed)."""
    head = ["model", "layers", "params", "memory", "x VAE", "saved", "CPU peak", "peak x VAE", "peak RSS", "paper mem",
            "paper x VAE", "paper params"]
    plain = any(r.get("ratio_to_unsmoothed") is not None for r in rows)
    if plain:
        head.append("x unsmoothed")
    out = []
    for r in rows:
        pm, pr = r["paper_memory_gb"], paper_ratio(r)
        pr = "-" if pr is None else f"{pr:.2f}"
        out.append([r["model"].upper(), str(r["layers"]), f"{r['parameters'] / 1e6:.2f}M", _gib(r["memory_bytes"]),
                    "-" if r["ratio_to_vae"] is None else f"{r['ratio_to_vae']:.2f}", _gib(r["saved_bytes"]),
                    _gib(r["cpu_peak_bytes"]),
                    "-" if r["cpu_peak_ratio_to_vae"] is None else f"{r['cpu_peak_ratio_to_vae']:.2f}",
                    _gib(r["rss_peak_bytes"]), "-" if pm is None else f"{pm}G", pr,
                    "-" if r["paper_parameters"] is None else f"{r['paper_parameters'] / 1e6:.1f}M"]
                   + (["-" if r.get("ratio_to_unsmoothed") is None else f"{r['ratio_to_unsmoothed']:.2f}"] if plain else []))
    w = [max(len(x[i]) for x in out + [head]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(x)) for x in out]
    if any(r["cpu_peak_bytes"] is not None for r in rows):
        lines.append(CPU_PEAK)
    return "\n".join(lines)


def write_json(rows: list, meta: dict, path: Path) -> None:
    """``{"meta": meta, "rows": rows}`` as indented JSON."""
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def write_csv(rows: list, path: Path) -> None:
    """One line per row, the columns CSV_COLUMNS (None as an empty cell)."""
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        wr.writeheader()
        for r in rows:
            wr.writerow({**{k: ("" if r.get(k) is None else r[k]) for k in COLUMNS},
                         "paper_ratio_to_vae": "" if paper_ratio(r) is None else paper_ratio(r)})


def write_plot(rows: list, path: Path) -> None:
    """PNG: memory per model (GiB) and its ratio to the VAE beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].upper()}-{r['layers']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows) + 4), 4))
    a1.bar(labels, [r["memory_bytes"] / 2**30 for r in rows], color="tab:blue")
    a1.set_ylabel(f"GiB ({rows[0]['memory_kind']})" if rows else "GiB")
    a1.set_title("memory of one training step")
    xs = range(len(rows))
    a2.bar([i - 0.2 for i in xs], [r["ratio_to_vae"] or 0 for r in rows], 0.4, label="measured")
    a2.bar([i + 0.2 for i in xs], [paper_ratio(r) or 0 for r in rows], 0.4, label="paper (Table 6)")
    a2.set_xticks(list(xs), labels)
    a2.set_title("ratio to the VAE of the same depth")
    a2.legend()
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
