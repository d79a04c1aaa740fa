"""`hvae-fast report`: figures and Markdown from synthetic sweep folders the tests write."""

import json
import re

import pytest

from hvae_fast.experiments import report, sweep
from hvae_fast.cli import main
from hvae_fast.errors import HVAEError

from test_sweep import fake_point, make_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def phase_sweep(tmp_path, critical=None):
    """rho 0.5 / 0.9 / 1.0 x seeds 0, 1: top KL 10 +- 1, 5 +- 1, then ~0 (collapse); a metrics.jsonl each."""
    axes = [("grid", "seed=0,1")] if critical else [("grid", "rho=0.5,0.9,1.0"), ("grid", "seed=0,1")]
    d = make_sweep(tmp_path, "phase", axes, critical=critical)
    kl = {0.5: 10.0, 0.9: 5.0, 1.0: 0.05}
    for rho in kl:
        for seed in (0, 1):
            run = fake_point(d, f"rho={rho},seed={seed}", rho=rho, elbo=-86.0 - seed, top_kl=kl[rho] + (seed - 0.5) * 2,
                             active_units=[40, 40, 30 + seed, 20 if rho < 1 else 0])
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
                {"split": "train", "step": 1, "elbo": -200.0, "top_kl": 1.0},
                {"split": "train", "step": 2, "elbo": -150.0, "top_kl": 2.0},
                {"split": "valid", "step": 2, "elbo": -151.0, "active_units": [1, 2, 3, 4]})))
    return d


def test_report_renders_the_phase_transition_tables_and_curves(tmp_path, capsys):
    d = phase_sweep(tmp_path)
    assert main(["report", str(d), "--output", str(tmp_path / "out"), "--threshold", "2"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out' / 'report.md'}"
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # every embedded figure exists and is a PNG
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG
    assert "(phase_transition.png)" in md and "(curves.png)" in md and "active_units_grid" not in md
    assert "largest rho with mean top-layer KL above 2 nats: **0.9**" in md
    assert "Training budget: 5,000 steps" in md
    # Table 4's HVAE rho=0.9 row beside the sweep's rho=0.9 points: mean +- std over the two seeds.
    i = md.index("| 4 | paper: static MNIST 40x4, HVAE rho=0.9 | 1,000,000 | - | -85.5 | 19.5 | 40, 40, 40, 40 |")
    mine = md[i:].splitlines()[1]
    assert mine.startswith("| 4 | this sweep: rho=0.9 | 5,000 | 2 | -86.50 ± 0.71 | 5.00 ± 1.41 | 40.0, 40.0, 30.5, 20.0 |")
    assert "no point with preset mnist-mlp-64-32-16-8" in md  # Table 3 is not in this sweep
    assert (d / "results.csv").exists() and (d / "summary.csv").exists()  # rebuilt from the run directories


def test_report_marks_the_interval_of_a_critical_search(tmp_path):
    crit = {"threshold": 1.0, "rho_low": 0.0, "rho_high": 1.0, "iterations": 4}
    d = phase_sweep(tmp_path, critical=crit)
    (d / "critical.json").write_text(json.dumps([{"group": {}, "low": 0.9, "high": 0.9375, "threshold": 1.0,
                                                  "iterations": 4, "runs": 8, "history": []}]))
    md = report.make_report(d).read_text()
    assert (d / "report" / "phase_transition.png").read_bytes()[:8] == PNG
    assert "critical rho in **[0.9, 0.9375]** (bisection on top-layer KL > 1 nats, 4 iterations, 8 runs)" in md
    assert "largest rho" not in md


def test_depth_by_width_grid_from_latent_sizes(tmp_path):
    d = make_sweep(tmp_path, "grid", [("grid", "latent-sizes=10;40;10,10;40,40"), ("grid", "seed=0,1")])
    for sizes, au in (("10", 5), ("40", 12), ("10-10", 9), ("40-40", 20)):
        for seed in (0, 1):
            fake_point(d, f"latent_sizes={sizes},seed={seed}", active_units=[au + seed])
    summary = sweep.summarize(sweep.collect_results(d), ["latent_sizes", "seed"])
    depths, widths, cells = report.grid_values(summary)
    assert (depths, widths) == ([1, 2], [10, 40])
    assert cells == {(1, 10): 5.5, (1, 40): 12.5, (2, 10): 9.5, (2, 40): 20.5}
    md = report.make_report(d).read_text()
    assert "![active units grid](active_units_grid.png)" in md and "phase_transition" not in md
    assert (d / "report" / "active_units_grid.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("row, dw", [({"depth": 3, "width": 100}, (3, 100)), ({"latent_sizes": "40,40,40"}, (3, 40)),
                                     ({"latent_sizes": 64}, (1, 64)), ({"rho": 0.5}, None)])
def test_depth_and_width_of_a_row(row, dw):
    assert report.depth_width(row) == dw


def test_largest_rho_above_threshold():
    assert report.largest_rho_above([(0.3, 9.0), (0.5, 2.5), (0.7, 0.4), (0.9, 3.0)], 1.0) == 0.9
    assert report.largest_rho_above([(0.3, 0.2)], 1.0) is None


def test_report_of_an_unfinished_or_foreign_folder_is_an_error(tmp_path, capsys):
    d = make_sweep(tmp_path, "empty", [("grid", "seed=0,1")])
    with pytest.raises(HVAEError, match="no point of .* has finished"):
        report.make_report(d)
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a sweep folder (no sweep.json)" in capsys.readouterr().err


def test_steering_report_pools_sweeps_and_judges_the_goal(tmp_path, capsys):
    # Fixed rho 0.7 / 0.9 / VAE in one sweep, a schedule and a controller in another (2 seeds each).
    # The schedule beats every fixed ELBO but lets the top layer go (2 < half of rho 0.7's 20 nats);
    # the controller keeps it (12 nats, 90 units >= 10, 80) with an ELBO >= the best fixed (-90).
    fixed = make_sweep(tmp_path, "fixed", [("list", "method=hvae,hvae,vae"), ("list", "rho=0.7,0.9,1"), ("grid", "seed=0,1")])
    steer = make_sweep(tmp_path, "steer", [("list", "rho_schedule=linear:0.5:1.0:100;constant"),
                                           ("list", "rho_control=0;5"), ("grid", "seed=0,1")])

    def train_log(run, rhos, kl):
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"split": "train", "step": 10 * (i + 1), "elbo": -100.0, "rho": r, "top_kl": kl}) for i, r in enumerate(rhos)))

    for method, rho, elbo, kl, au in (("hvae", 0.7, -95.0, 20.0, 40), ("hvae", 0.9, -90.0, 8.0, 25), ("vae", 1, -91.0, 0.5, 12)):
        for seed in (0, 1):
            run = fake_point(fixed, f"method={method},rho={rho},seed={seed}", rho=rho, method=method,
                             elbo=elbo - seed, top_kl=kl + seed, active_units=[au] * 4)
            train_log(run, [rho] * 3, kl)
    for sched, ctl, elbo, kl, au in (("linear:0.5:1.0:100", 0, -89.0, 2.0, 15), ("constant", 5, -89.5, 12.0, 22.5)):
        for seed in (0, 1):
            run = fake_point(steer, f"rho_schedule={sched},rho_control={ctl},seed={seed}", rho=0.5,
                             ou={"rho_schedule": sched, "rho_control": ctl}, elbo=elbo - seed, top_kl=kl + seed,
                             active_units=[au] * 4)
            train_log(run, [0.5, 0.75, 1.0] if ctl == 0 else [0.7, 0.8, 0.78], kl)
    out = tmp_path / "out"
    assert main(["report", str(fixed), str(steer), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (out / "rho_steering.png").read_bytes()[:8] == PNG and "(rho_steering.png)" in md
    assert "Best fixed setting by mean validation ELBO: method=hvae, rho=0.9 (-90.50 ± 0.71, n = 2)." in md
    assert "Fixed rho = 0.7 keeps top-layer KL 20.50 ± 0.71 nats and 160.0 ± 0.0 active units." in md
    rows = [l for l in md.splitlines() if l.startswith("| method=hvae, rho=0.5, rho_schedule=")]
    assert len(rows) == 2
    sched = next(l for l in rows if "linear" in l)
    ctl = next(l for l in rows if "rho_control=5" in l)
    assert sched.endswith("| yes | 2.50 ± 0.71 | 60.0 ± 0.0 | no | not met |"), sched
    assert ctl.endswith("| yes | 12.50 ± 0.71 | 90.0 ± 0.0 | yes | met |"), ctl
    # A VAE's config carries an unused rho: unless rho is swept, its row has none.
    v = make_sweep(tmp_path, "v", [("grid", "seed=0")])
    fake_point(v, "seed=0", rho=0.9, method="vae")
    assert sweep.collect_results(v)[0]["rho"] is None


def test_a_sweep_without_steering_has_no_steering_section(tmp_path):
    md = report.make_report(phase_sweep(tmp_path)).read_text()
    assert "rho_steering" not in md and "steers itself" not in md


def test_a_pooled_row_without_the_varying_keys_is_named_by_its_sweep_method_and_rho():
    # e.g. a fixed-rho sweep (axis: seed only) pooled with a steered one (axes rho_schedule, rho_control)
    keys = ["rho_schedule", "rho_control"]
    fixed = {"sweep": "rho-fixed-40k", "method": "hvae", "rho": 0.7, "n": 1}
    steered = {"sweep": "rho-steer-40k", "method": "hvae", "rho": 0.7, "rho_schedule": "constant", "rho_control": 25}
    assert report._label(fixed, keys) == "sweep=rho-fixed-40k, method=hvae, rho=0.7"
    assert report._label(steered, keys) == "rho_schedule=constant, rho_control=25"
    assert report._label({"preset": "p", "method": "vae"}, []) == "preset=p, method=vae"
