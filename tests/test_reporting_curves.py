"""`hvae-fast plot`: reads metrics.jsonl (tolerating a partial last line), smooths the training ELBO
with an EMA, and writes the figure."""

import json
import logging

import pytest

from hvae_fast.cli import main
from hvae_fast.config import RunConfig
from hvae_fast.errors import HVAEError
from hvae_fast.reporting import curves
from hvae_fast.reporting.curves import EMA_WEIGHT, ema, read_metrics


def write_run(path, partial_last_line=True, method="hvae"):
    path.mkdir()
    cfg = RunConfig(method=method)
    (path / "config.json").write_text(cfg.to_json())
    lines = []
    for step in range(5, 105, 5):
        lines.append(json.dumps({"split": "train", "step": step, "elbo": -200 + step / 2, "top_kl": 1 + step / 100}))
        if step % 25 == 0:
            lines.append(json.dumps({"split": "valid", "step": step, "elbo": -190 + step / 3,
                                     "active_units": [40, 30, 5, 1]}))
    text = "\n".join(lines) + "\n"
    if partial_last_line:
        text += '{"split": "train", "step": 105, "el'  # a run killed mid-write
    (path / "metrics.jsonl").write_text(text)
    return path


def test_plot_writes_a_png_and_skips_a_partial_last_line(tmp_path, capsys, caplog):
    run = write_run(tmp_path / "run")
    out = tmp_path / "curves.png"
    with caplog.at_level(logging.WARNING, logger="hvae_fast.reporting.curves"):
        assert main(["plot", str(run), str(write_run(tmp_path / "vae", False, "vae")), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
    assert any("partial last line 25" in r.getMessage() for r in caplog.records)
    label, train, valid = read_metrics(run)
    assert label == "hvae, rho=0.9, K=5"
    # A ladder is labelled with its rho when it was smoothed (rho < 1), as a plain baseline otherwise.
    assert read_metrics(write_run(tmp_path / "lvae", False, "lvae"))[0] == "lvae, rho=0.9, K=5"
    assert read_metrics(write_run(tmp_path / "vae2", False, "vae"))[0] == "vae"
    assert [r["step"] for r in train] == list(range(5, 105, 5)) and [r["step"] for r in valid] == [25, 50, 75, 100]


def test_plot_writes_pdf_and_svg(tmp_path):
    run = write_run(tmp_path / "run", False)
    for ext, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        assert main(["plot", str(run), "--output", str(tmp_path / f"c{ext}")]) == 0
        assert (tmp_path / f"c{ext}").read_bytes().startswith(magic)


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[3] = "garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HVAEError, match="line 4 is not a metrics record"):
        read_metrics(run)


def test_resumed_steps_keep_the_later_record(tmp_path):
    run = write_run(tmp_path / "run", False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train", "step": 10, "elbo": 0.0, "top_kl": 0.0}) + "\n")
    _, train, _ = read_metrics(run)
    assert [r["elbo"] for r in train if r["step"] == 10] == [0.0] and len(train) == 20


def test_ema_is_the_normalised_geometric_average():
    xs = [3.0, -1.0, 4.0, 1.0, -5.0, 9.0]
    for n in range(1, len(xs) + 1):
        w = [EMA_WEIGHT ** (n - 1 - i) for i in range(n)]
        assert ema(xs)[n - 1] == pytest.approx(sum(wi * x for wi, x in zip(w, xs)) / sum(w))
    assert ema([7.0] * 4) == pytest.approx([7.0] * 4)


def test_two_runs_with_the_same_settings_get_different_labels(tmp_path):
    same = ["hvae, rho=0.9, K=5"] * 2
    assert curves.line_labels([tmp_path / "seed0", tmp_path / "seed1"], None, same) == [
        "hvae, rho=0.9, K=5 (seed0)", "hvae, rho=0.9, K=5 (seed1)"]
    # same folder name too: the path tells them apart
    assert curves.line_labels(["a/run", "b/run"], None, same) == ["hvae, rho=0.9, K=5 (run) (a/run)",
                                                                 "hvae, rho=0.9, K=5 (run) (b/run)"]
    assert curves.line_labels(["a", "b"], None, ["vae", "hvae"]) == ["vae", "hvae"]


def test_plot_labels_name_the_lines(tmp_path, capsys):
    a, b = write_run(tmp_path / "seed0", False), write_run(tmp_path / "seed1", False)
    out = tmp_path / "c.svg"
    assert main(["plot", str(a), str(b), "--labels", "first run", "second run", "--output", str(out)]) == 0
    svg = out.read_text()  # matplotlib writes each text's string as a comment
    assert "<!-- first run -->" in svg and "<!-- second run -->" in svg and "hvae, rho" not in svg
    assert main(["plot", str(a), str(b), "--output", str(out)]) == 0
    assert "<!-- hvae, rho=0.9, K=5 (seed0) -->" in out.read_text()
    capsys.readouterr()
    assert main(["plot", str(a), str(b), "--labels", "only one", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--labels names 1 lines for 2 runs" in err and len(err.splitlines()) == 1
