"""The paper's Tables 3 and 4 (posterior collapse on dynamic and static MNIST), every row, and the
rule that says which of this project's runs measure the same thing as a row.

Conventions, the paper's (its captions and /work/shared/paper): active units are listed top to
bottom, the top stochastic layer first (8,16,32,54 on the 64-32-16-8 model only fits that order);
"V. ELBO (L100)" is the importance-weighted bound with L = 100 samples on the validation set. The
project's own lists run bottom to top (layer 1 = nearest the data), so ``top_to_bottom`` turns them.
"""

from __future__ import annotations

from ..config import PAPER_STEPS

TABLE_STEPS = PAPER_STEPS["table3"]  # Tables 3 and 4: 1M steps
PAPER_IW_SAMPLES = 100  # the L of the paper's "V. ELBO (L100)" column

_SMALL = ("mnist", (64, 32, 16, 8), (512, 256, 128, 64))  # dynamic MNIST, 64-32-16-8
_WIDE_DYN = ("mnist", (40, 40, 40, 40), (200, 200, 200, 200))  # dynamic MNIST, 40-40-40-40
_WIDE_STATIC = ("binarized-mnist", (40, 40, 40, 40), (200, 200, 200, 200))  # static MNIST, 40x4


def _row(table, model, arch, method, elbo, top_kl, au, recon=None, kl=None, rho=None, anneal=False,
         free_bits=False, iw_k=None) -> dict:
    dataset, latent, hidden = arch
    return {"table": table, "model": model, "dataset": dataset, "latent_sizes": latent, "hidden_sizes": hidden,
            "method": method, "rho": rho, "kl_anneal": anneal, "free_bits": free_bits, "iw_samples_train": iw_k,
            "iw_bound": elbo, "recon": recon, "kl_total": kl, "top_kl": top_kl, "active_units_top_down": au}


# Every row of Tables 3 and 4 as printed: V. ELBO (L100), reconstruction, KL, top KL, active units
# top to bottom. iw_k: IWAE's training samples where the paper states them.
PAPER_ROWS = [
    _row(3, "IWAE (64-32-16-8)", _SMALL, "iwae", -84.46, 4.88, (3, 15, 30, 64), -65.3, 23.98),
    _row(3, "IWAE (40-40-40-40)", _WIDE_DYN, "iwae", -84.63, 1.18, (0, 4, 37, 40), -65.5, 23.98),
    _row(3, "VAE+KL (64-32-16-8)", _SMALL, "vae", -84.6, 6.2, (6, 11, 25, 49), -60.3, 28.8, anneal=True),
    _row(3, "VAE+KL (40-40-40-40)", _WIDE_DYN, "vae", -84.7, 1.13, (1, 6, 15, 40), -60.8, 28.07, anneal=True),
    _row(3, "VAE+Freebits (64-32-16-8)", _SMALL, "vae", -85.5, 3.8, (2, 4, 9, 21), -64.2, 25.1, free_bits=True),
    _row(3, "VAE+Freebits (40-40-40-40)", _WIDE_DYN, "vae", -86.0, 2.46, (1, 2, 8, 18), -65.8, 23.6, free_bits=True),
    _row(3, "HVAE (rho = 0.95) (64-32-16-8)", _SMALL, "hvae", -81.6, 8.99, (8, 16, 32, 54), -59.78, 26.1, rho=0.95),
    _row(3, "HVAE (rho = 0.9) (64-32-16-8)", _SMALL, "hvae", -81.7, 9.56, (8, 16, 32, 43), -60.0, 25.6, rho=0.9),
    _row(3, "HVAE (rho = 0.95) (40-40-40-40)", _WIDE_DYN, "hvae", -84.4, 9.34, (40, 40, 40, 40), -65.7, 23.7, rho=0.95),
    _row(4, "VAE", _WIDE_STATIC, "vae", -86.4, 0.82, (1, 3, 9, 17)),
    _row(4, "IWAE (5 samples)", _WIDE_STATIC, "iwae", -84.9, 1.005, (1, 3, 9, 24), iw_k=5),
    _row(4, "VAE+KL", _WIDE_STATIC, "vae", -84.5, 1.2, (2, 3, 11, 37), anneal=True),
    _row(4, "VAE+Freebits", _WIDE_STATIC, "vae", -87.0, 1.3, (1, 1, 8, 17), free_bits=True),
    _row(4, "HVAE (rho = 0.85)", _WIDE_STATIC, "hvae", -85.2, 20.6, (40, 40, 40, 24), rho=0.85),
    _row(4, "HVAE (rho = 0.9)", _WIDE_STATIC, "hvae", -85.5, 19.5, (40, 40, 40, 40), rho=0.9),
    _row(4, "HVAE+KL (rho = 0.95)", _WIDE_STATIC, "hvae", -84.2, 23.5, (38, 34, 17, 40), rho=0.95, anneal=True),
]


def run_variant(cfg: dict) -> dict:
    """What a row needs to know of a run's config.json (a dict): dataset, architecture, method,
    rho, whether it annealed the KL or used free bits, IWAE's samples, whether rho was steered."""
    model, train, ou = cfg.get("model", {}), cfg.get("train", {}), cfg.get("ou", {})
    return {"dataset": cfg.get("dataset"), "latent_sizes": tuple(model.get("latent_sizes") or ()),
            "hidden_sizes": tuple(model.get("hidden_sizes") or ()), "method": cfg.get("method"),
            "rho": ou.get("rho"), "kl_anneal": tuple(train.get("kl_anneal") or (0, 0)) != (0, 0),
            "free_bits": (train.get("free_bits") or 0) > 0, "iw_samples_train": train.get("iw_samples_train"),
            "steered": ou.get("rho_schedule", "constant") != "constant" or (ou.get("rho_control") or 0) > 0}


def matches(paper: dict, run: dict) -> bool:
    """Whether a run (run_variant) trains what a paper row trained: same data, architecture,
    method and variant (KL annealing, free bits, IWAE's samples where stated), and for the HVAE
    the same fixed rho."""
    same = all(run[k] == paper[k] for k in ("dataset", "latent_sizes", "hidden_sizes", "method", "kl_anneal",
                                            "free_bits"))
    if paper["iw_samples_train"] is not None and run["iw_samples_train"] != paper["iw_samples_train"]:
        return False
    if paper["method"] == "hvae":
        return same and not run["steered"] and run["rho"] is not None and abs(run["rho"] - paper["rho"]) < 1e-9
    return same


def top_to_bottom(group: dict, stat: str = "mean") -> list:
    """A summary group's per-layer active units (``active_units_layer_i_<stat>``, i = 1 at the
    bottom), top layer first."""
    layers = sorted((k for k in group if k.startswith("active_units_layer_") and k.endswith(f"_{stat}")),
                    key=lambda k: int(k.split("_")[3]))
    return [group[k] for k in reversed(layers)]


def _units(v) -> str:
    """A mean count of active units: whole numbers as such, else one decimal."""
    return f"{v:g}" if float(v).is_integer() else f"{v:.1f}"


def _pm(g: dict, m: str) -> str:
    mean, std = g.get(f"{m}_mean"), g.get(f"{m}_std")
    return "-" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


HEADER = ["| table | model | source | steps | seeds | V. ELBO (L=100) | ELBO (L=1) | reconstruction | KL | top KL | "
          "active units, top to bottom |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def render(groups_per_row: list, label) -> tuple[list, list]:
    """(Markdown lines, data rows) of both tables: each paper row, then this project's groups that
    match it (summary groups of the matching runs, each with ``iw_L``, the L of its IW bound), or
    "not run". ``label(group)`` names a group. In the data rows active units are per layer,
    ``active_units_layer_i`` (i = 1 at the bottom, as everywhere in the project's files)."""
    md, data = list(HEADER), []
    for p, groups in zip(PAPER_ROWS, groups_per_row):
        au = ", ".join(map(str, p["active_units_top_down"]))
        md.append(f"| {p['table']} | {p['model']} | paper | {TABLE_STEPS:,} | - | {p['iw_bound']} | - | "
                  f"{p['recon'] or '-'} | {p['kl_total'] or '-'} | {p['top_kl']} | {au} |")
        data.append({"table": p["table"], "model": p["model"], "source": "paper", "steps": TABLE_STEPS,
                     **{k: p[k] for k in ("iw_bound", "recon", "kl_total", "top_kl")},
                     **{f"active_units_layer_{len(p['active_units_top_down']) - j}": u
                        for j, u in enumerate(p["active_units_top_down"])}})
        if not groups:
            md.append(f"| {p['table']} | {p['model']} | this project: not run | | | | | | | | |")
            data.append({"table": p["table"], "model": p["model"], "source": "not run"})
        for g in groups:
            iw = _pm(g, "iw_bound") if g.get("iw_L") == PAPER_IW_SAMPLES else f"not measured (eval L={g.get('iw_L')})"
            units = top_to_bottom(g)
            md.append(f"| {p['table']} | {p['model']} | this project: {label(g)} | {g.get('steps', '-'):,} | {g['n']} | "
                      f"{iw} | {_pm(g, 'elbo')} | {_pm(g, 'recon')} | {_pm(g, 'kl_total')} | {_pm(g, 'top_kl')} | "
                      f"{', '.join(map(_units, units))} |")
            data.append({"table": p["table"], "model": p["model"], "source": label(g), "steps": g.get("steps"),
                         "n": g["n"], "iw_samples": g.get("iw_L"),
                         **{f"{m}_{s}": g.get(f"{m}_{s}") for m in ("iw_bound", "elbo", "recon", "kl_total", "top_kl")
                            for s in ("mean", "std")},
                         **{k: v for k, v in g.items() if k.startswith("active_units_")}})
    return md, data
