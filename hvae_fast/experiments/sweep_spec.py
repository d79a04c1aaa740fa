"""A sweep's spec (what ``sweep.json`` holds): axes of flag values, their points, the points'
folder names, and the checks that a spec read from disk or a --spec file is one.

A point's folder name is ``key=value,...`` (``rho=0.5,seed=1``). A value that is not a plain token
(letters, digits, ``. _ + -``; commas become ``-``: ``latent_sizes=40-40``) is written as a readable
part and a hash of the value (``data_dir=_a~3b1f0c2e``), so that no name holds ``/`` or is ``..``
and every folder stays inside the sweep folder; the values themselves reach ``train`` unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
from pathlib import Path

from ..errors import HVAEError

OWNED_FLAGS = ("--out", "--resume", "--no-progress")  # the sweep sets these itself
SPEC_FILE_KEYS = ("base", "grid", "list", "eval_iw_samples", "eval_max_examples", "find_critical_rho")
_PLAIN = re.compile(r"[A-Za-z0-9+_-][A-Za-z0-9.+_-]*")  # no '/', no leading '.': never '..' or hidden
_KEY = re.compile(r"[a-z0-9][a-z0-9_]*")
NAME_BYTES = 200  # a folder name's limit is 255 bytes; room for "logs/<name>.train.log" and temp names


def parse_axis(kind: str, text: str) -> dict:
    """``"rho=0.3,0.5"`` -> {"kind", "key", "values"}; values containing commas are separated by ';'."""
    key, sep, vals = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key or not vals.strip():
        raise HVAEError(f"--{kind} {text!r}: expected FLAG=V1,V2,... (e.g. --{kind} rho=0.5,0.9)")
    if not _KEY.fullmatch(key):
        raise HVAEError(f"--{kind} {text!r}: {key!r} is not a train flag name (lower-case letters, digits, '-')")
    values = [v.strip() for v in vals.split(";" if ";" in vals else ",")]
    # a --list axis may repeat a value (--list hidden_sizes=200;200,200 beside distinct latent_sizes):
    # only its zipped points must differ, which make_spec checks
    if any(not v for v in values) or (kind == "grid" and len(set(values)) != len(values)):
        raise HVAEError(f"--{kind} {text!r}: values must be non-empty{' and distinct' if kind == 'grid' else ''}")
    return {"kind": kind, "key": key, "values": values}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_spec_file(path) -> dict:
    """A JSON or TOML spec: {base: "train ..." or [...], grid: {k: [v]}, list: {k: [v]}, eval_iw_samples,
    eval_max_examples, find_critical_rho: {threshold, rho_low, rho_high, iterations}}; flags given on
    the command line add axes and override the other fields."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise HVAEError(f"cannot read the sweep spec {path}: {exc}; pass a JSON or .toml file") from exc
    if not isinstance(d, dict):
        raise HVAEError(f"sweep spec {path}: expected a table of {', '.join(SPEC_FILE_KEYS)}")
    unknown = set(d) - set(SPEC_FILE_KEYS)
    if unknown:
        raise HVAEError(f"sweep spec {path}: unknown keys {sorted(unknown)}; use base, grid, list, "
                        f"eval_iw_samples, eval_max_examples, find_critical_rho")
    return d


def make_spec(base, axes, eval_iw_samples: int = 100, eval_max_examples: int = 0, critical: dict | None = None) -> dict:
    """Check and normalise a sweep spec (what sweep.json holds)."""
    base = list(base.split() if isinstance(base, str) else base)
    if base[:1] == ["--"]:
        base = base[1:]
    if not base or base[0] != "train":
        raise HVAEError("a sweep needs its base command after `--`, starting with train: "
                        "`hvae-fast sweep NAME --grid seed=0,1 -- train binarized-mnist --steps 5000`")
    keys = [a["key"] for a in axes]
    if len(set(keys)) != len(keys):
        raise HVAEError(f"a flag is swept twice in {keys}: give each flag one --grid or --list")
    for f in base:
        name = f.split("=")[0]
        if name in OWNED_FLAGS:
            raise HVAEError(f"the base command must not set {name}: the sweep sets it for each point")
        if name.startswith("--") and name[2:].replace("-", "_") in keys:
            raise HVAEError(f"{name} is both in the base command and swept: remove it from the base command")
    lists = [a for a in axes if a["kind"] == "list"]
    if len({len(a["values"]) for a in lists}) > 1:
        raise HVAEError("--list axes are zipped, so they need the same number of values: "
                        + ", ".join(f"{a['key']} has {len(a['values'])}" for a in lists))
    zipped = list(zip(*(a["values"] for a in lists)))
    if len(set(zipped)) != len(zipped):
        raise HVAEError("two --list alternatives are the same point: " + ", ".join(
            "/".join(map(str, z)) for z in sorted({z for z in zipped if zipped.count(z) > 1})))
    names = [point_name(v) for v in expand(axes)]  # "40,40" and "40-40" would share a folder
    shared = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if shared:
        raise HVAEError("two points would share one folder: " + ", ".join(shared)
                        + ": keep one of the values that differ only in ',' against '-'")
    if critical is not None:
        if "rho" in keys:
            raise HVAEError("--find-critical-rho chooses rho itself: remove rho from --grid/--list")
        if not 0 <= critical["rho_low"] < critical["rho_high"] <= 1 or critical["iterations"] < 1:
            raise HVAEError("--find-critical-rho needs 0 <= --rho-low < --rho-high <= 1 and --iterations >= 1")
    if eval_iw_samples < 0 or eval_max_examples < 0:
        raise HVAEError("--eval-iw-samples and --eval-max-examples must be >= 0 (0 = skip the IW bound / all examples)")
    return {"base": base, "axes": [dict(a) for a in axes], "eval_iw_samples": eval_iw_samples,
            "eval_max_examples": eval_max_examples, "critical": critical}


def expand(axes) -> list[dict]:
    """The points of a sweep, as {key: value string} in axis order: the product of the grid axes and
    of one axis of zipped --list alternatives (placed where the first --list axis appears)."""
    factors, list_done = [], False
    for a in axes:
        if a["kind"] == "grid":
            factors.append([[(a["key"], v)] for v in a["values"]])
        elif not list_done:
            lists = [b for b in axes if b["kind"] == "list"]
            factors.append([[(b["key"], b["values"][i]) for b in lists] for i in range(len(lists[0]["values"]))])
            list_done = True
    return [dict(pair for part in combo for pair in part) for combo in itertools.product(*factors)]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def name_part(value: str) -> str:
    """A value as it appears in a folder name: itself with commas as '-' if that is a plain token
    (``40,40`` -> ``40-40``), else a readable part and a hash of the value (``/a`` -> ``_a~<8 hex>``)."""
    plain = value.replace(",", "-")
    if _PLAIN.fullmatch(plain) and len(plain) <= 64:
        return plain
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", plain)[:32].lstrip(".") + "~" + _digest(value)


def point_name(point: dict) -> str:
    """``rho=0.5,seed=1``: one folder name inside the sweep folder (see the module docstring)."""
    name = ",".join(f"{k}={name_part(v)}" for k, v in point.items()) or "base"
    if len(name.encode()) > NAME_BYTES:  # many long values: a prefix and the hash of the whole name
        name = name[:NAME_BYTES - 20] + "~" + _digest(name)
    return name


def typed(v: str):
    """An axis value for tables and plots: int, else float, else the string."""
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


# -- sweep.json, as read back ------------------------------------------------------------------------

def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _spec_problem(d) -> str | None:
    """What is wrong with a sweep.json's content ``d``, or None if it is a spec make_spec wrote."""
    if not isinstance(d, dict):
        return "not a JSON object"
    for k in ("base", "axes", "eval_iw_samples"):
        if k not in d:
            return f"no {k!r}"
    if not isinstance(d["base"], list) or not d["base"] or not all(isinstance(x, str) for x in d["base"]):
        return "'base' is not a list of strings"
    if not isinstance(d["axes"], list):
        return "'axes' is not a list"
    for a in d["axes"]:
        if not (isinstance(a, dict) and a.get("kind") in ("grid", "list") and isinstance(a.get("key"), str)
                and _KEY.fullmatch(a["key"]) and isinstance(a.get("values"), list) and a["values"]
                and all(isinstance(v, str) and v for v in a["values"])):
            return f"axis {str(a)[:60]} is not {{kind: grid|list, key, values: [strings]}}"
    if len({len(a["values"]) for a in d["axes"] if a["kind"] == "list"}) > 1:
        return "its --list axes differ in length"
    for k in ("eval_iw_samples", "eval_max_examples"):
        if not (isinstance(d.get(k, 0), int) and not isinstance(d.get(k, 0), bool) and d.get(k, 0) >= 0):
            return f"{k!r} is not an integer >= 0"
    n = d.get("nproc_per_point", 1)
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        return "'nproc_per_point' is not an integer >= 1"
    c = d.get("critical")
    if c is not None and not (isinstance(c, dict) and all(_is_num(c.get(k)) for k in
                                                           ("threshold", "rho_low", "rho_high", "iterations"))):
        return "'critical' is not {threshold, rho_low, rho_high, iterations} numbers"
    return None


def read_spec(sweep_dir) -> dict:
    """The spec in ``sweep_dir/sweep.json``; HVAEError naming the file if it is absent or damaged."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise HVAEError(f"{sweep_dir} is not a sweep folder (no sweep.json): pass a folder made by `hvae-fast sweep`")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        d, problem = None, f"unreadable ({str(exc)[:80] or type(exc).__name__})"
    else:
        problem = _spec_problem(d)
    if problem:
        raise HVAEError(f"{path} is damaged: {problem}; restore it, or re-run the sweep's command under "
                        f"another NAME (its finished points are then run again)")
    return d


def grows(old: dict, new: dict) -> bool:
    """Whether `new` only adds points to `old`: the same axes (keys and kinds, in order), and every old
    point among the new ones, so that every finished run directory keeps its name and its meaning."""
    shape = lambda spec: [(a["kind"], a["key"]) for a in spec["axes"]]  # noqa: E731
    if shape(old) != shape(new) or old.get("critical") or new.get("critical"):
        return False
    new_points = {point_name(v) for v in expand(new["axes"])}
    return all(point_name(v) in new_points for v in expand(old["axes"]))


def parse_point_name(name: str, spec: dict) -> dict | None:
    """{key: value string} of a run-directory name of this sweep, or None if it is not one."""
    axes = {a["key"]: a["values"] for a in spec["axes"]}
    keys = (["rho"] if spec.get("critical") else []) + list(axes)
    try:
        parts = dict(part.split("=", 1) for part in name.split(","))
    except ValueError:
        return None
    if sorted(parts) != sorted(keys):
        return None
    vals = {}
    for k in keys:
        if k == "rho" and k not in axes:
            vals[k] = parts[k]
        else:
            match = [v for v in axes[k] if name_part(v) == parts[k]]
            if not match:
                return None
            vals[k] = match[0]
    return vals
