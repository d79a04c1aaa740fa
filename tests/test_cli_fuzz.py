"""Fuzz the command line: random flag values through each subcommand's parser and its config
validation (never training). Each run either succeeds or fails as a user error: an HVAEError of one
line, or argparse's exit status 2; any other exception is a bug."""

import argparse
import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvae_fast import cli
from hvae_fast.training import rundir
from hvae_fast.errors import HVAEError

EDGE_VALUES = ["nan", "inf", "-inf", "1e23", "1e-400", "0", "-1", "0.5", "1", "2", "1e3", "9" * 30, "", " ", "0x10",
               "1_000", "é"]
EDGE = st.sampled_from(EDGE_VALUES)
NAMES = st.sampled_from(["x.foo", "x.png", "x.json", "/missing/dir/x.png", "/", ".", "a\0b", "cuda:99", "cuda", "cpu",
                         "auto", "torch", "vae", "iwae", "lvae", "hvae", "resnet", "ratio", "mnist-mlp-lvae-5",
                         "cifar10-resnet-4", "binarized-mnist", "/nonexistent/config.json"])
VALUES = st.one_of(
    EDGE,
    st.lists(EDGE, min_size=1, max_size=4).map(",".join),  # comma lists: --kl-anneal, --latent-sizes, --depths
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    NAMES,
    # Free text, but not option-like: "-h" / "--he..." would ask for help (exit 0), not a value.
    st.text(max_size=12).filter(lambda s: not s.startswith("-")),
)


def subparser(name):
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flags_of(name):
    """[(flag, takes a value)] of a subcommand, without --help and without --print-config."""
    return [(a.option_strings[0], a.nargs != 0) for a in subparser(name)._actions
            if a.option_strings and a.option_strings[0] not in ("-h", "--print-config")]


def _memory_checks(args):
    from hvae_fast.ops.ou import check_ou_args

    check_ou_args(args.rho, args.samples)


def _plot_checks(args):
    from hvae_fast.reporting.curves import read_metrics

    for run in args.run_dirs:
        read_metrics(run)


COMMANDS = {  # subcommand: (positional arguments, the validation it runs before any heavy work)
    "train": (["binarized-mnist"], cli.config_from_args),
    "eval": (["/nonexistent/run"], lambda args: rundir.load_run(args.run_dir, args.device)),
    "sample": (["/nonexistent/run"], lambda args: rundir.load_run(args.run_dir, args.device)),
    "memory": ([], _memory_checks),
    "plot": (["/nonexistent/run"], _plot_checks),
}


def check(parser, argv, validate):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
        validate(args)
    except HVAEError as exc:
        assert "\n" not in str(exc), str(exc)
    except SystemExit as exc:
        assert exc.code == 2, (argv, err.getvalue())
        assert err.getvalue().startswith("hvae-fast: error: ") and err.getvalue().count("\n") == 1, err.getvalue()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_flag_with_each_edge_value(command):
    positional, validate = COMMANDS[command]
    parser = cli.build_parser()
    values = EDGE_VALUES + [",".join(p) for p in zip(EDGE_VALUES, ["5"] * len(EDGE_VALUES))] + \
        [",".join(p) for p in zip(["5"] * len(EDGE_VALUES), EDGE_VALUES)]
    for flag, takes_value in flags_of(command):
        for v in values if takes_value else [None]:
            check(parser, [command, *positional, flag] + ([v] if takes_value else []), validate)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_random_flag_values_are_accepted_or_a_user_error(command):
    positional, validate = COMMANDS[command]
    parser = cli.build_parser()
    pairs = st.lists(st.tuples(st.sampled_from(flags_of(command)), VALUES), min_size=1, max_size=5)

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(pairs)
    def run(chosen):
        argv = [command, *positional]
        for (flag, takes_value), value in chosen:
            argv += [flag, value] if takes_value else [flag]
        check(parser, argv, validate)

    run()
