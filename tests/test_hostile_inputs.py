"""Hostile and careless inputs (issue 18 items 4, 5, 8, 10, 11): caches that were tampered with
are verified and rebuilt, never trusted and never fatal to a good source; bad flags, configs and
output paths get one line before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hvae_fast import data as D
from hvae_fast.data import cache
from hvae_fast.errors import HVAEError

from datatools import amat_bytes, cache_files, isolated_env, patch_spec, sha256, synthetic, write  # noqa: F401

# --------------------------------------------------------------------------------------------
# 4. The parsed-array cache and the digest records
# --------------------------------------------------------------------------------------------


def _amat_source(tmp_path, monkeypatch, n=3, publisher_digest=False):
    """A binarized-MNIST test file of n random images; its record fits it (and publishes its
    sha256 when ``publisher_digest``)."""
    x = np.random.default_rng(0).integers(0, 2, (n, 784))
    body = amat_bytes(x)
    synthetic(monkeypatch, "binarized-mnist", test=n)
    if publisher_digest:
        patch_spec(monkeypatch, "binarized-mnist", digests={"binarized_mnist_test.amat": sha256(body)})
    src = write(tmp_path / "binarized_mnist" / "binarized_mnist_test.amat", body)
    return src, x


def _load(tmp_path):
    return D.load_dataset("binarized-mnist", "test", data_dir=tmp_path, download=False)


def _images(ds):
    return ds.images.reshape(len(ds.images), 784).numpy()


PLANTED = {
    "zeros": lambda a: np.zeros_like(a),
    "x200": lambda a: (a * 200).astype(np.uint8),
    "10 rows": lambda a: np.repeat(a[:1], 10, axis=0),
    "float64": lambda a: a.astype(np.float64),
}


@pytest.mark.parametrize("plant,forge_record", [(p, False) for p in PLANTED]
                         + [(p, True) for p in PLANTED if p != "zeros"])  # forged zeros are valid data
def test_planted_parsed_array_is_reparsed(tmp_path, monkeypatch, plant, forge_record):
    """A planted .npy (zeros, values x200, 10 rows, float64) is never used: its digest does not
    match the record, and where the record was forged to match it, the shape, dtype or value
    range does not match the dataset's; the split is re-parsed with a warning."""
    src, x = _amat_source(tmp_path, monkeypatch)
    _load(tmp_path)
    (npy,) = cache_files("binarized-mnist-test-*.images.npy")
    bad = PLANTED[plant](np.load(npy))
    np.save(npy, bad)
    if forge_record:
        (rec,) = cache_files("binarized-mnist-test-*.json")
        record = json.loads(rec.read_text())
        record["parts"]["images"] = cache._describe(bad)
        rec.write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match="cached binarized-mnist test split"):
        again = _load(tmp_path)
    assert np.array_equal(_images(again), x)
    # The re-parse rewrote the entry.
    np.testing.assert_array_equal(np.load(npy).reshape(3, 784), x)


def test_damaged_split_record_is_reparsed(tmp_path, monkeypatch):
    src, x = _amat_source(tmp_path, monkeypatch)
    _load(tmp_path)
    (rec,) = cache_files("binarized-mnist-test-*.json")
    for planted in ("[" * 100_000, "not json", "[]", '{"v": 3, "sources": [], "parts": {}}'):
        rec.write_text(planted)
        with pytest.warns(RuntimeWarning, match="parsing the source files again"):
            assert np.array_equal(_images(_load(tmp_path)), x)


def test_edit_keeping_size_and_mtime_is_seen_once_the_parsed_cache_is_gone(tmp_path, monkeypatch):
    """The (size, mtime) record saves hashing on a cache hit; a parse hashes the file again."""
    src, x = _amat_source(tmp_path, monkeypatch)
    _load(tmp_path)
    st = src.stat()
    write(src, amat_bytes(1 - x))  # same size, other content
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    for f in cache_files("binarized-mnist-*"):
        f.unlink()
    with pytest.warns(RuntimeWarning, match="digest on record"):
        assert np.array_equal(_images(_load(tmp_path)), 1 - x)


@pytest.mark.parametrize("how", ["edit keeping size and mtime", "planted digest record"])
def test_altered_source_with_a_matching_record_is_refused(tmp_path, monkeypatch, how):
    """A file whose content no longer has the publisher's digest is refused when it is parsed,
    whatever the (size, mtime) record says."""
    src, x = _amat_source(tmp_path, monkeypatch, publisher_digest=True)
    good = sha256(src.read_bytes())
    _load(tmp_path)
    st = src.stat()
    write(src, amat_bytes(1 - x))  # flipped, same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    for f in cache_files("binarized-mnist-*"):
        f.unlink()
    if how == "planted digest record":
        for f in cache_files("digests/*.json"):
            f.unlink()
        cache.remember_digest(src, good)
    with pytest.warns(RuntimeWarning, match="digest on record"), pytest.raises(HVAEError, match="damaged"):
        _load(tmp_path)


def test_wrong_recorded_digest_does_not_refuse_a_good_file(tmp_path, monkeypatch):
    src, x = _amat_source(tmp_path, monkeypatch, publisher_digest=True)
    cache.remember_digest(src, "0" * 64)
    with pytest.warns(RuntimeWarning, match="digest on record"):
        assert np.array_equal(_images(_load(tmp_path)), x)
    assert cache.known_digest(src) == sha256(src.read_bytes())  # the record was put right


# --------------------------------------------------------------------------------------------
# 5. auto-backend.json
# --------------------------------------------------------------------------------------------

BAD_DECISIONS = {
    "no ms": {"choice": "torch"},
    "ms a string": {"choice": "torch", "ms": "fast"},
    "ms a list": {"choice": "torch", "ms": [1.0, 2.0]},
    "ms of strings": {"choice": "torch", "ms": {"torch": "1"}},
}


def _auto_cache_file(tmp_path, monkeypatch, decision):
    import torch

    from hvae_fast.ops import autotune

    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_AUTO", {})
    env = autotune.environment_key("cpu")
    good = {"choice": "torch", "ms": {"torch": 1.0}}
    # The shape class of the default model's first OU call at batch 8 (a train below reads it).
    key = autotune.shape_class("correlated_samples", "cpu", torch.float32, 8 * 40, 5)
    path = tmp_path / "auto-backend.json"
    if isinstance(decision, str):
        path.write_text(decision)
    else:
        path.write_text(json.dumps({"format": 1, "environments": {env: {key: decision, "kept": good}}}))
    return path


@pytest.mark.parametrize("decision", [*BAD_DECISIONS, "100k-deep JSON"])
def test_malformed_auto_backend_cache_warns_in_info(tmp_path, monkeypatch, capsys, caplog, decision):
    from hvae_fast.cli import main

    bad = BAD_DECISIONS.get(decision, "[" * 100_000 + "]" * 100_000)
    _auto_cache_file(tmp_path, monkeypatch, bad)
    with caplog.at_level("WARNING", logger="hvae_fast.ops.autotune"):
        assert main(["info"]) == 0
        assert main(["info", "--json"]) == 0
    assert any("auto-backend cache" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr().out
    if decision != "100k-deep JSON":
        assert "    kept -> torch (torch 1 ms)" in out  # the good decisions are kept


def test_malformed_auto_backend_cache_is_replaced_by_a_default_train(tmp_path, monkeypatch, shared_data, capsys):
    from hvae_fast.cli import main

    path = _auto_cache_file(tmp_path, monkeypatch, BAD_DECISIONS["ms a string"])
    code = main(["train", "binarized-mnist", "--steps", "1", "--batch-size", "8", "--eval-examples", "8",
                 "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--no-progress", "--data-dir", str(shared_data)])
    assert code == 0, capsys.readouterr().err
    sections = json.loads(path.read_text())["environments"].values()
    assert all(isinstance(rec["ms"], dict) for sec in sections for rec in sec.values())


# --------------------------------------------------------------------------------------------
# 13. The README's test command, as written
# --------------------------------------------------------------------------------------------


def test_a_relative_data_dir_is_taken_from_where_the_program_started(tmp_path, monkeypatch):
    from conftest import SHARED_DATA
    from hvae_fast.data import sources

    assert SHARED_DATA.is_absolute()
    start = os.getcwd()
    monkeypatch.setenv("HVAE_DATA_DIR", os.path.relpath(tmp_path / "data", start))
    monkeypatch.chdir(tmp_path)  # as tests/test_readme.py does
    assert sources.resolve_data_dir() == tmp_path / "data"
    monkeypatch.setenv("HVAE_DATA_DIR", str(tmp_path / "abs"))
    assert sources.resolve_data_dir() == tmp_path / "abs"


def test_ci_runs_the_readmes_test_command_verbatim():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    commands = re.findall(r'pip install -e "\.\[test\]" && (.*pytest.*)$', (repo / "README.md").read_text(), re.M)
    assert len(commands) == 1, "the README's test command is not where this test looks for it"
    assert commands[0] in (repo / ".ci" / "run").read_text().splitlines()
    assert "../shared/data" in commands[0]  # relative, as a user types it from the repository root


# --------------------------------------------------------------------------------------------
# 11. Hostile --config, --spec of the wrong types, --threshold
# --------------------------------------------------------------------------------------------


def _one_line_error(capsys, args, *needles):
    from hvae_fast.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # a flag's value refused by the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hvae-fast") and "error: " in err and len(err) < 600, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("text,needle", [
    ('{"train": {"steps": ' + "9" * 5000 + "}}", "4300 digits"),
    ('{"train": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"train": {"lr": ' + "9" * 4000 + "}}", "lr is an integer of 4000 digits"),
    ('{"train": {"steps": ' + "9" * 30 + "}}", "--steps is an integer of 30 digits"),
    ('{"model": {"hidden_sizes": [' + "9" * 25 + "]}}", "an entry of --hidden-sizes"),
], ids=["5000-digit int", "100k-deep", "float field overflows", "int over 2**63", "list entry over 2**63"])
def test_hostile_config_is_one_line(tmp_path, capsys, text, needle):
    cfg = write(tmp_path / "c.json", text.encode())
    _one_line_error(capsys, ["train", "binarized-mnist", "--config", str(cfg), "--out", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("spec,needle", [
    ({"grid": [1, 2]}, "'grid' must map each flag"),
    ({"grid": {"seed": 5}}, "'grid' must map each flag"),
    ({"list": {"seed": [[0], [1]]}}, "'list' must map each flag"),
    ({"base": 5}, "'base' must be the train command"),
    ({"eval_iw_samples": "100"}, "'eval_iw_samples' must be an integer"),
    ({"find_critical_rho": 0.5}, "'find_critical_rho' must be an object"),
    ({"find_critical_rho": {"threshold": "high"}}, "threshold must be a finite number"),
    ({"find_critical_rho": {"threshold": 1, "iterations": "4"}}, "iterations must be a finite number"),
    ([1, 2], "expected a table"),
])
def test_spec_fields_of_the_wrong_type_are_one_line(tmp_path, capsys, spec, needle):
    path = write(tmp_path / "s.json", json.dumps(spec).encode())
    _one_line_error(capsys, ["sweep", "s", "--root", str(tmp_path / "sw"), "--spec", str(path), "--",
                             "train", "binarized-mnist", "--steps", "1"], str(path) if "threshold" not in needle
                    and "iterations" not in needle else "", needle)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("threshold", ["nan", "inf"])
def test_find_critical_rho_refuses_a_threshold_that_is_not_finite(tmp_path, capsys, threshold):
    _one_line_error(capsys, ["sweep", "s", "--root", str(tmp_path / "sw"), "--find-critical-rho", "--threshold",
                             threshold, "--", "train", "binarized-mnist", "--steps", "1"],
                    "threshold must be a finite number")
    assert not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------------------------
# 8. Out of memory from the size flags: one line naming the flag, before any allocation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--hidden-sizes", "1000000,1000000,1000000,1000000"),
                                        ("--latent-sizes", "1000000000000,1000000000000,1000000000000,1000000000000")])
def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys, flag, value):
    _one_line_error(capsys, ["train", "binarized-mnist", flag, value, "--device", "cpu", "--out", str(tmp_path / "r")],
                    "out of memory", f"{flag} {value}")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import SHARED_DATA
    from test_trainer_cli import tiny_config
    from hvae_fast.training.trainer import Trainer

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("tiny") / "run"
    Trainer(tiny_config(steps=2, log_every=1, eval_every=2, checkpoint_every=2, sample_every=2, eval_examples=8,
                        batch_size=8), out, data_dir=SHARED_DATA, progress=False).fit()
    return out


@pytest.mark.parametrize("args,needle", [
    (["gradvar", "--K", "100000000", "--rho", "0.5", "--batches", "1", "--draws", "4"], "--K 100000000"),
    (["spectrum", "--noise", "100000000", "--points", "16"], "--noise 100000000"),
])
def test_diagnostics_too_large_for_memory_are_one_line(tiny_run, monkeypatch, capsys, args, needle):
    from hvae_fast.training import oom

    # A 1 GiB machine, so that the check (not a 12 GB allocation) is what this test meets everywhere.
    monkeypatch.setattr(oom, "device_memory", lambda device: (2**30, "CPU"))
    from conftest import SHARED_DATA

    _one_line_error(capsys, [args[0], str(tiny_run), *args[1:], "--no-progress", "--data-dir", str(SHARED_DATA)],
                    "out of memory", needle)


# --------------------------------------------------------------------------------------------
# 10. Output paths checked before the work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gradvar", "spectrum"])
@pytest.mark.parametrize("flag,name,needle", [
    ("--json", "missing/out.json", "does not exist"),
    ("--json", "folder.json", "is a folder"),
    ("--json", "out.txt", "use one of the extensions .json"),
    ("--plot", "missing/out.png", "does not exist"),
    ("--plot", "out.bmp", "use one of the extensions"),
])
def test_diagnostics_output_paths_are_checked_before_the_work(tmp_path, monkeypatch, capsys, command, flag, name,
                                                              needle):
    from hvae_fast.experiments import diagnostics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.json").mkdir()
    monkeypatch.setattr(diagnostics, "_checkpoint_models", lambda args: pytest.fail("did the work first"))
    _one_line_error(capsys, [command, str(tmp_path / "no-run"), flag, name], needle)


def test_report_output_is_checked_and_a_read_only_sweep_is_only_read(tmp_path, capsys):
    from test_report import phase_sweep

    d = phase_sweep(tmp_path)
    blocker = write(tmp_path / "a-file", b"")
    _one_line_error(capsys, ["report", str(d), "--output", str(blocker)], "it is a file")
    existing = tmp_path / "existing"
    existing.mkdir()
    from hvae_fast.cli import main

    assert main(["report", str(d), "--output", str(existing), "--threshold", "2"]) == 0
    assert (existing / "report.md").exists()
    capsys.readouterr()
    # A read-only sweep: the report goes to --output and nothing in the sweep changes.
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    modes = {p: p.stat().st_mode for p in [d, *d.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user who can write read-only folders (root)")
        assert main(["report", str(d), "--output", str(tmp_path / "out2"), "--threshold", "2"]) == 0
        assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before
        _one_line_error(capsys, ["report", str(d)], "is not a writable folder")
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# --------------------------------------------------------------------------------------------
# 15. The newcomer's first minutes
# --------------------------------------------------------------------------------------------


def test_the_first_cpp_build_says_it_compiles(tmp_path, caplog):
    import logging

    from hvae_fast.ops import native

    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++ {\n")  # fails fast: the message comes before the compiler
    ext = native.NativeExtension("hvae_fast_first_build_test", ("broken.cpp",), src_dir=src, build_dir=tmp_path / "b")
    with caplog.at_level(logging.INFO, logger="hvae_fast.ops.native"):
        ext.probe()
    assert any("compiling the C++ kernels, once, about a minute" in r.getMessage() for r in caplog.records)


def test_a_torch_build_lock_left_by_a_killed_build_is_removed_with_a_warning(tmp_path, caplog):
    """A `train` killed while torch compiled leaves torch's `lock` file (its FileBaton waits for it
    forever); the next build, holding our flock on the folder, removes it and names it."""
    import logging

    from hvae_fast.ops import native

    build = tmp_path / "b"
    build.mkdir()
    (build / "lock").write_text("")
    with caplog.at_level(logging.INFO, logger="hvae_fast.ops.native"):
        with native.build_lock(build):
            assert not (build / "lock").exists()
    assert any(r.levelno == logging.WARNING and str(build / "lock") in r.getMessage() for r in caplog.records)
    with native.build_lock(build):  # a folder without one: nothing said
        pass
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_a_torch_build_lock_is_kept_while_another_process_builds(tmp_path, caplog):
    """While another process holds our build flock, its torch `lock` is live: the build waits for it and
    removes nothing; once the other build is done, a `lock` still there is stale."""
    import fcntl
    import logging
    import threading
    import time

    from hvae_fast.ops import native

    build = tmp_path / "b"
    build.mkdir()
    (build / "lock").write_text("")
    entered = threading.Event()

    def build_now():
        with native.build_lock(build):
            entered.set()

    with caplog.at_level(logging.INFO, logger="hvae_fast.ops.native"):
        with open(build / native.BUILD_LOCK, "a+") as held:  # another open file: flock refuses the build's
            held.write("4242\n")
            held.flush()
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waiter = threading.Thread(target=build_now, daemon=True)
            waiter.start()
            time.sleep(1.0)
            assert not entered.is_set() and (build / "lock").exists()
        waiter.join(30)
    assert entered.is_set() and not (build / "lock").exists()
    assert any("waiting for process 4242 to finish building" in r.getMessage() for r in caplog.records)


def test_benchmarks_write_no_tracked_file_unless_asked(monkeypatch):
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", repo / "bench" / "conftest.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("HVAE_BENCH_JSON", raising=False)
    path = bench._default_json_path()
    assert path is not None and repo not in path.resolve().parents
    monkeypatch.setenv("HVAE_BENCH_JSON", "bench/results/cpu-latest.json")
    assert bench._default_json_path() == Path("bench/results/cpu-latest.json")
