"""Every number the Results pages quote comes from a committed results file (issue 21.2).

The text checked: docs/results.md when it exists, and the README's "## Results" and "## OU
smoothing for ladder VAEs" sections. Code
blocks, inline code and link targets are commands and paths, not results, and are left out; so
are the patterns of NOT_RESULTS (names, sizes, references). Every other number must equal, at the
precision it is quoted with, a value in some CSV or JSON file under docs/results/ (any depth):
its value, its magnitude (prose says "by 8.3 nats" of a difference of -8.3), or the value in the
quoted unit (G = GiB of bytes or the paper's G, M = millions or MiB, k = thousands, % = a fraction,
ms, min and h = seconds).
Nothing is skipped: a number without data fails the test, with its sentence.

`hvae-fast report` writes those files (report.md's "Data" section lists them); copy a report
folder's *.csv and *.json to docs/results/NAME/.
"""

import csv
import json
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "docs" / "results"

# Numbers in the text that are not results, each with why. Matched (regex) and removed before
# the numbers are read; keep this list short and every entry explicit.
NOT_RESULTS = {
    r"\b(?:mlp-?)?40x4\b|\b\d+-\d+-\d+-\d+\b|\b(?:10|40|100)x3\b": "model names: latent sizes",
    r"\bFigs?\. \d(?: and \d)?|\bTables? \d(?:[-/]\d| and \d)?|\bissue \d+(?:\.\d+)?": "references to the paper, issues",
    r"\b\d-core\b|\b\d threads\b|\bCIFAR-10\b|\bh_\d|\bW_\d|O\(1 - rho\^2\)": "the machine, dataset names, notation",
    r"\bof (?:30|40|120|160)\b": "totals of units of a model (sizes)",
    r"\b100k(?:-step| steps)": "the paper's training budget for Figs. 1 and 3 (a step count)",
    r"\b10,000(?= validation| images)": "the size of the validation split",
}
UNITS = {"": (1.0,), "%": (100.0,), "k": (1e-3,), "M": (1e-6, 2.0**-20), "MiB": (2.0**-20,), "G": (2.0**-30, 1e-9, 1.0),
         "x": (1.0,), "ms": (1e3,), "s": (1.0,), "min": (1 / 60,), "h": (1 / 3600,)}
NUMBER = re.compile(r"(?<![\w.])(-?)(\d+(?:,\d{3})*(?:\.\d+)?)(MiB|ms|%|k|M|G|x|\s(?:MiB|ms|s|min|h)\b)?(?![\w])")


# The README's sections that quote measured results.
RESULTS_SECTIONS = ("Results", "OU smoothing for ladder VAEs")


def results_text() -> list[tuple[str, str]]:
    """(page, text) of the Results pages."""
    pages = []
    readme = (REPO / "README.md").read_text()
    for section in RESULTS_SECTIONS:
        m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
        if m:
            pages.append(("README.md", m.group(1)))
    if (REPO / "docs" / "results.md").exists():
        pages.append(("docs/results.md", (REPO / "docs" / "results.md").read_text()))
    return pages


def quoted_numbers(text: str) -> list[tuple[str, str, str]]:
    """(number as written, unit, the line it is on) of every number quoted in ``text``."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link and image targets
    for pattern in NOT_RESULTS:
        text = re.sub(pattern, " ", text)
    out = []
    for line in text.splitlines():
        for m in NUMBER.finditer(line):
            out.append((m.group(1) + m.group(2), (m.group(3) or "").strip(), line.strip()))
    return out


def _numbers_in(value, out: list) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out.append(float(value))
    elif isinstance(value, str):
        try:
            out.append(float(value))
        except ValueError:  # a name with numbers in it (latent_sizes "10,10"): each of them
            out.extend(float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", value))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers_in(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers_in(v, out)


def committed_values() -> list[float]:
    """Every number in the CSV and JSON files under docs/results/."""
    values = []
    for path in sorted(RESULTS_DIR.rglob("*")):
        if path.suffix == ".json":
            _numbers_in(json.loads(path.read_text()), values)
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                for row in csv.reader(f):
                    _numbers_in(row, values)
    return values


def backed(written: str, unit: str, values) -> bool:
    """Whether some value, in ``unit``, rounds to ``written`` at its quoted precision."""
    q = float(written.replace(",", ""))
    decimals = len(written.split(".")[1]) if "." in written else 0
    tol = 0.5 * 10.0**-decimals * (1 + 1e-9)
    return any(abs(abs(v * scale) - abs(q)) <= tol for v in values for scale in UNITS[unit])


def test_the_checker_reads_numbers_units_and_precision():
    nums = quoted_numbers("| 1 | -148.66 | 12.66M | 2.17G | 1.75x | 49% | 11.3 ms | 20k steps | `--steps 5000` "
                          "static MNIST 40x4 (Fig. 1), 1 of 160 and 2186-2224")
    assert [(n, u) for n, u, _ in nums] == [("1", ""), ("-148.66", ""), ("12.66", "M"), ("2.17", "G"), ("1.75", "x"),
                                            ("49", "%"), ("11.3", "ms"), ("20", "k"), ("1", ""), ("2186", ""),
                                            ("2224", "")]
    assert backed("-148.66", "", [-148.65594]) and not backed("-148.6", "", [-148.65594])
    assert backed("8.4", "", [-8.35]) and not backed("8.4", "", [8.34])  # magnitude; rounding at the quoted precision
    assert backed("2.17", "G", [2328133640]) and backed("49", "%", [0.4903]) and backed("20", "k", [20000])


def test_every_results_number_is_in_a_committed_results_file():
    pages = results_text()
    assert pages, "no Results section in README.md and no docs/results.md"
    values = committed_values()
    missing = [f"{page}: {n}{unit} in: {line}" for page, text in pages
               for n, unit, line in quoted_numbers(text) if not backed(n, unit, values)]
    assert not missing, (f"{len(missing)} numbers quoted in the Results pages are in no CSV/JSON under docs/results/ "
                         "(write them with `hvae-fast report`, or correct the text):\n" + "\n".join(missing))
