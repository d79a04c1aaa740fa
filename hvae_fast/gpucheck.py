"""`python -m hvae_fast.gpucheck --out DIR` (also `hvae-fast gpucheck`): every GPU check in one command.

Stages, in this order, each a subprocess in the source checkout. Each stage has a weight (its
seconds at the default budget; the weights sum to it): the plan gives stage i ``budget * w_i / sum
w``, and a stage starts with ``left * w_i / (sum of the weights still to run)``, so time an early
stage leaves goes to the later ones and the whole stays within ``--budget`` seconds (default 450,
under 8 minutes on one H100). A budget whose plan gives a stage under 10 s is refused; a stage that
starts with under 10 s of the budget left is skipped. On a GPU every stage runs with HVAE_REQUIRE_CPP=1 and
HVAE_REQUIRE_CUDA=1: a CUDA extension that did not build fails the build stage, the kernel tests and
the op benchmarks instead of skipping.

  build            ``hvae-fast build``: the C++ and CUDA extensions (hvae_fast.ops.native.build_all)
  info             ``hvae-fast info --json``: versions, the GPU, every OU backend's availability
  tests            pytest of the kernel suites (test_backends, test_kernels_triton, test_native),
                   ``-m "not slow"``, TRITON_INTERPRET unset: compiled Triton and CUDA, fp32/bf16/fp16
  bench-steps      pytest bench/bench_train_step.py: VAE, HVAE torch/triton/cuda(/recompute) steps
  memory-recompute ``hvae-fast memory --models vae,hvae --depths 4 --recompute`` (the memory goal)
  bench-ops        pytest bench/bench_ou_ops.py without torch.compile: eager torch, triton, cuda
  memory           ``hvae-fast memory``: the paper's Table 6 with CUDA peaks
  bench-ops-compiled  the op benchmarks of torch.compile (slowest to start: compiles last)

After every stage DIR/report.md and DIR/report.json are rewritten, so a run cut short still leaves
a report; a stage that fails or runs out of time is recorded with the last lines of its output
(the whole output is in DIR/<stage>.log) and the check goes on. The report marks the GPU goals of
issue 10 met / not met / not measured:
  * the HVAE (K=5) step <= 1.3x the VAE step, cifar10-resnet-4 at batch 64 (best fused backend);
  * the fused ops >= 70% of the GPU's memory bandwidth at the large benchmark sizes;
  * the HVAE-4 peak <= 1.25x the VAE-4 peak with --recompute (CUDA max_memory_allocated).

Without CUDA it refuses (exit 2) unless ``--allow-cpu``: the same stages in a quick CPU mode
(HVAE_BENCH_QUICK=1, tiny memory tables, only the probe and CUDA-parametrised kernel tests, which
skip), which shows the pipeline works, not how fast anything is; every goal is then not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import HVAEError
from .fsutil import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ("tests/test_backends.py", "tests/test_kernels_triton.py", "tests/test_native.py")
BUDGET_S = 450
MIN_STAGE_S = 10
TAIL_LINES = 25
STEP_GOAL, BW_GOAL, MEM_GOAL = 1.3, 0.70, 1.25


@dataclass
class Stage:
    """One subprocess of the check. ``outputs``: files it writes into the out folder (names)."""

    name: str
    argv: list
    budget_s: float  # the stage's weight: its seconds at the default --budget (plan() scales it)
    outputs: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    stdout_to: str | None = None  # a file name: stdout goes there, stderr to the log
    # Filled in by run_stages:
    status: str = "pending"  # pending | ok | failed | timeout | skipped
    rc: int | None = None
    seconds: float | None = None
    timeout_s: float | None = None
    tail: list = field(default_factory=list)
    note: str = ""


def stages(out: Path, cpu: bool) -> list:
    """The check's stages; ``cpu``: the quick CPU rehearsal (tiny sizes, subset of the tests)."""
    py = sys.executable
    quick = {"HVAE_BENCH_QUICK": "1"} if cpu else {}
    # On a GPU a missing C++ or CUDA extension is an error in every stage, never a skip.
    require = {} if cpu else {"HVAE_REQUIRE_CPP": "1", "HVAE_REQUIRE_CUDA": "1"}
    # Small nets for the CPU memory tables: the preset's 100 maps x 6 blocks take minutes on a CPU.
    small = ["--device", "cpu", "--batch-size", "2", "--channels", "8", "--blocks", "1", "--samples", "2"] if cpu \
        else ["--device", "cuda"]
    depth = "2" if cpu else "4"
    tests = [py, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-m", "not slow",
             "-rfE", f"--junitxml={out / 'tests.xml'}", *KERNEL_TESTS]
    if cpu:  # the probes, and the CUDA cases, which skip here: shows the stage runs, in seconds
        tests += ["-k", "probe or cuda"]

    def bench(file, json_name, weight, *extra):
        return Stage(f"bench-{json_name}", [py, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                                            file, "--benchmark-only", f"--benchmark-json={out / (json_name + '.json')}",
                                            *extra], weight, [json_name + ".json"], dict(quick, **require))

    def memory(name, weight, *flags):
        return Stage(name, [py, "-m", "hvae_fast", "memory", *small, *flags, "--json", str(out / f"{name}.json"),
                            "--csv", str(out / f"{name}.csv")], weight, [f"{name}.json", f"{name}.csv"], dict(require))

    # Weights: seconds at the default budget, summing to BUDGET_S (test_gpucheck checks the sum).
    return [
        Stage("build", [py, "-m", "hvae_fast", "build"], 80, env=dict(require)),
        Stage("info", [py, "-m", "hvae_fast", "info", "--json"], 20, ["info.json"], dict(require),
              stdout_to="info.json"),
        Stage("tests", tests, 85, ["tests.xml"], dict(require)),
        bench("bench/bench_train_step.py", "steps", 70),
        memory("memory-recompute", 35, "--models", "vae,hvae", "--depths", depth, "--recompute"),
        bench("bench/bench_ou_ops.py", "ops", 75, "-k", "not torch-compile"),
        memory("memory", 35, *(["--depths", depth, "--baseline-depths", depth] if cpu else [])),
        bench("bench/bench_ou_ops.py", "ops-compiled", 50, "-k", "torch-compile"),
    ]


def plan(sts: list, budget_s: float) -> dict:
    """{stage: seconds} the budget guarantees each stage: budget * weight / sum of the weights.

    Raises HVAEError when a stage would get under MIN_STAGE_S."""
    total = sum(st.budget_s for st in sts)
    limits = {st.name: budget_s * st.budget_s / total for st in sts}
    short = [n for n, t in limits.items() if t < MIN_STAGE_S]
    if short:
        need = MIN_STAGE_S * total / min(st.budget_s for st in sts)
        raise HVAEError(f"--budget {budget_s:g} gives the {short[0]} stage {limits[short[0]]:.1f} s, under the "
                        f"{MIN_STAGE_S} s a stage needs: pass --budget {math.ceil(need)} or more")
    return limits


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled Triton on a GPU; the test files set it themselves without one
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _tail(path: Path, n: int = TAIL_LINES) -> list:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:300] for ln in lines if "USDT:" not in ln][-n:]  # USDT: the profiler's own start/stop chatter


def run_stage(st: Stage, out: Path, timeout_s: float) -> None:
    """Run one stage (stdout+stderr to out/<name>.log), kill its process group on timeout; fill in st."""
    log = out / f"{st.name}.log"
    st.timeout_s = round(timeout_s, 1)
    t0 = time.perf_counter()
    with open(log, "wb") as lf:
        so = open(out / st.stdout_to, "wb") if st.stdout_to else lf
        try:
            # A session of its own: a timeout kills the stage's children too (compile workers, ninja).
            proc = subprocess.Popen(st.argv, cwd=REPO, env=_env(st.env), stdout=so, stderr=lf,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                st.rc = proc.wait(timeout=timeout_s)
                st.status = "ok" if st.rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                st.status, st.rc = "timeout", proc.returncode
                st.note = f"stopped after its {timeout_s:.0f} s limit"
        except OSError as exc:
            st.status, st.note = "failed", f"could not start: {exc}"
        finally:
            if so is not lf:
                so.close()
    st.seconds = round(time.perf_counter() - t0, 1)
    st.tail = _tail(log)


def run_stages(sts: list, out: Path, meta: dict, budget_s: float = BUDGET_S) -> dict:
    """Run ``sts`` in order within ``budget_s``; rewrite the reports after each. Returns the last report."""
    deadline = time.monotonic() + budget_s
    rep = write_reports(out, sts, meta)
    for i, st in enumerate(sts):
        left = deadline - time.monotonic()
        limit = left * st.budget_s / sum(s.budget_s for s in sts[i:])  # its share of what is left
        if left < MIN_STAGE_S:
            st.status, st.note = "skipped", f"the --budget of {budget_s:.0f} s was spent before this stage"
        else:
            print(f"gpucheck: {st.name} (limit {limit:.0f} s) ...", flush=True)
            run_stage(st, out, limit)
            print(f"gpucheck: {st.name} {st.status} in {st.seconds} s" + (f": {st.note}" if st.note else ""), flush=True)
        rep = write_reports(out, sts, meta)
    return rep


# -- reading the stages' outputs -----------------------------------------------------------------------

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(path: Path) -> dict | None:
    """{tests, failures, errors, skipped, passed} of a pytest --junitxml file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    c = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def _goal(name, status, detail):
    return {"goal": name, "status": status, "detail": detail}


def goals(out: Path, cpu: bool) -> list:
    """The issue's three GPU goals from the stages' outputs: met / not met / not measured."""
    from .reporting import bench as br

    g = []
    label = f"HVAE K=5 step <= {STEP_GOAL}x the VAE step (cifar10-resnet-4, batch 64)"
    data = _load(out / "steps.json")
    steps = br.groups(data).get(br.CIFAR_GROUP, {}) if data else {}
    vae = steps.get("vae")
    if cpu:
        g.append(_goal(label, "not measured", "CPU rehearsal (--allow-cpu): a GPU goal"))
    elif not vae:
        g.append(_goal(label, "not measured", "no vae result in steps.json (see the bench-steps stage)"))
    elif vae["extra_info"].get("batch") != 64:
        g.append(_goal(label, "not measured", f"the step benchmark ran at batch {vae['extra_info'].get('batch')}"))
    else:
        ratios = {n: br._median(b) / br._median(vae) for n, b in steps.items() if n.startswith("hvae-")}
        fused = {n: r for n, r in ratios.items() if n.removeprefix("hvae-") in ("triton", "cuda")}
        detail = ", ".join(f"{n} {r:.2f}x" for n, r in sorted(ratios.items())) + " (--compile: not benchmarked)"
        g.append(_goal(label, ("met" if min(fused.values()) <= STEP_GOAL else "not met") if fused else "not measured",
                       ("best fused: " if fused else "no fused backend ran; ") + detail))

    label = f"fused ops >= {BW_GOAL:.0%} of the GPU's memory bandwidth (large sizes, best fused backend per op and mode)"
    data = _load(out / "ops.json")
    best = {}
    for grp, benches in (br.groups(data) if data else {}).items():
        for n, b in benches.items():
            ei = b.get("extra_info", {})
            if n in ("triton", "cuda") and ei.get("large") and ei.get("bandwidth_frac") is not None:
                best[grp] = max(best.get(grp, (0.0, "")), (ei["bandwidth_frac"], n))  # the figure and its backend
    if cpu:
        g.append(_goal(label, "not measured", "CPU rehearsal (--allow-cpu): a GPU goal"))
    elif not best:
        g.append(_goal(label, "not measured", "no fused op result at a large size in ops.json (see bench-ops)"))
    else:
        bw = (data.get("hvae_fast", {}).get("gpu_bandwidth") or {})
        ref = f" of {bw.get('reference_Bps', 0) / 1e9:.0f} GB/s ({bw.get('reference')})" if bw else ""
        g.append(_goal(label, "met" if min(f for f, _ in best.values()) >= BW_GOAL else "not met",
                       "; ".join(f"{k.removeprefix('op-')}: {f:.0%} ({n})" for k, (f, n) in sorted(best.items())) + ref))

    label = f"HVAE-4 peak <= {MEM_GOAL}x the VAE-4 peak with --recompute (CUDA max_memory_allocated)"
    rows = (_load(out / "memory-recompute.json") or {}).get("rows", [])
    by = {r["model"]: r for r in rows}
    if "vae" in by and "hvae" in by:
        r = by["hvae"]["memory_bytes"] / by["vae"]["memory_bytes"]
        detail = f"{r:.2f}x at {by['vae']['layers']} layers ({by['vae']['memory_kind']})"
        if by["hvae"]["cpu_peak_bytes"]:
            detail += f"; CPU true peak {by['hvae']['cpu_peak_bytes'] / by['vae']['cpu_peak_bytes']:.2f}x"
        g.append(_goal(label, "not measured" if cpu else "met" if r <= MEM_GOAL else "not met",
                       ("CPU rehearsal (--allow-cpu), small nets: " if cpu else "") + detail))
    else:
        g.append(_goal(label, "not measured", "no vae and hvae rows in memory-recompute.json (see that stage)"))
    return g


# -- the reports ------------------------------------------------------------------------------------

def write_reports(out: Path, sts: list, meta: dict) -> dict:
    """Rewrite out/report.json and out/report.md from the stages so far (atomic renames)."""
    rep = dict(meta, updated=_now(), stages=[asdict(s) for s in sts], goals=goals(out, meta["mode"] != "cuda"),
               tests=test_counts(out / "tests.xml"), info=_load(out / "info.json"))
    for name, text in (("report.json", json.dumps(rep, indent=2) + "\n"), ("report.md", markdown(rep, out))):
        atomic_write_text(text, out / name)
    return rep


def markdown(rep: dict, out: Path) -> str:
    from .reporting import bench, memory_table

    info = rep.get("info") or {}
    lines = [f"# hvae-fast gpucheck ({rep['mode']})", "",
             f"- started {rep['started']}, updated {rep['updated']}, budget {rep['budget_s']} s",
             "- plan on a GPU (s per stage, at least; time a stage leaves goes to the later ones): " + ", ".join(
                 f"{n} {t:g}" for n, t in (rep.get("plan") or {}).items())
             + f" = {sum((rep.get('plan') or {}).values()):.0f} s",
             f"- device: {info.get('cuda_device') or rep.get('device', '?')}; torch {info.get('torch', '?')}, "
             f"triton {info.get('triton', '?')}, hvae_fast {info.get('hvae_fast', '?')}"]
    for dev, st in (info.get("backends") or {}).items():
        lines.append(f"- OU backends on {dev} (auto -> {st.get('auto')}): " + "; ".join(
            f"{n} {'yes' if s['available'] else 'no (' + s['reason'] + ')'}" for n, s in st.items() if n != "auto"))
    if rep["mode"] != "cuda":
        lines.append("- **CPU rehearsal (--allow-cpu)**: quick sizes; shows that every stage runs, not GPU figures")
    lines += ["", "## Goals", ""] + [f"- {g['goal']}: **{g['status'].upper()}** ({g['detail']})" for g in rep["goals"]]
    lines += ["", "## Stages", "", "| stage | status | seconds | limit s | rc | outputs |", "|---|---|---|---|---|---|"]
    for s in rep["stages"]:
        lines.append(f"| {s['name']} | {s['status']}{' (' + s['note'] + ')' if s['note'] else ''} | "
                     f"{'' if s['seconds'] is None else s['seconds']} | {s['timeout_s'] or ''} | "
                     f"{'' if s['rc'] is None else s['rc']} | {', '.join(s['outputs'])} |")
    t = rep.get("tests")
    if t:
        lines += ["", f"Kernel tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped (tests.xml)"]
    for s in rep["stages"]:
        if s["status"] in ("failed", "timeout"):
            lines += ["", f"### {s['name']}: {s['status']}, last lines of {s['name']}.log", "", "```", *s["tail"], "```"]
    for name in ("steps", "ops", "ops-compiled"):
        if (out / f"{name}.json").is_file():
            try:
                lines += ["", f"## Benchmarks: {name}.json", "", bench.report(out / f"{name}.json")]
            except (ValueError, KeyError, TypeError) as exc:
                lines += ["", f"{name}.json is unreadable: {type(exc).__name__}: {exc}"]
    for name in ("memory-recompute", "memory"):
        data = _load(out / f"{name}.json")
        if data and data.get("rows"):
            lines += ["", f"## Memory: {name}.json ({data['meta'].get('memory_kind')})", "", "```",
                      memory_table.format_table(data["rows"]), "```"]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def run(out: Path, allow_cpu: bool = False, budget_s: float = BUDGET_S, only=None) -> dict:
    """The whole check into ``out``; raises HVAEError without CUDA unless ``allow_cpu``."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not allow_cpu:
        raise HVAEError(f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False): run "
                        "gpucheck on a GPU machine, or pass --allow-cpu for the quick CPU rehearsal")
    # The GPU plan is checked in every mode: a --allow-cpu rehearsal shows that the GPU run's plan fits.
    gpu_plan = plan(stages(out, cpu=False), budget_s)
    if not all((REPO / p).is_file() for p in KERNEL_TESTS) or not (REPO / "bench").is_dir():
        raise HVAEError(f"gpucheck needs the source checkout's tests/ and bench/, not found under {REPO}: "
                        "run it from a clone of the repository (python -m hvae_fast.gpucheck in its root)")
    import importlib.util

    if importlib.util.find_spec("hvae_fast.kernels") is None:
        raise HVAEError("hvae_fast.kernels (the Triton kernels) is not importable: link it in the checkout with "
                        "`ln -s ../kernels hvae_fast/kernels`, or `pip install -e . --no-build-isolation --no-deps`")
    sts = stages(out.resolve(), cpu=not cuda)
    if only:
        bad = sorted(set(only) - {s.name for s in sts})
        if bad:
            raise HVAEError(f"unknown stages {', '.join(bad)}: choose from {', '.join(s.name for s in sts)}")
        sts = [s for s in sts if s.name in only]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HVAEError(f"cannot create --out {out}: {exc.strerror or exc}; pass a writable folder") from None
    plan(sts, budget_s)
    meta = {"mode": "cuda" if cuda else "cpu-quick", "started": _now(), "budget_s": budget_s,
            "plan": {n: round(t, 1) for n, t in gpu_plan.items()},
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "repo": str(REPO), "argv": sys.argv[1:]}
    return run_stages(sts, out, meta, budget_s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json, the logs and results")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA: a quick CPU rehearsal of every stage")
    p.add_argument("--budget", type=float, default=BUDGET_S, metavar="SECONDS",
                   help=f"time for all stages together (default {BUDGET_S}); a stage is cut at what is left")
    p.add_argument("--stages", type=lambda s: [v for v in s.split(",") if v], metavar="A,B",
                   help="run only these stages (e.g. bench-steps,memory-recompute to redo two)")


def cmd_gpucheck(args) -> int:
    rep = run(args.out, args.allow_cpu, args.budget, args.stages)
    print(f"wrote {args.out / 'report.md'} and report.json")
    for g in rep["goals"]:
        print(f"  {g['status']:<12} {g['goal']}")
    bad = [s["name"] for s in rep["stages"] if s["status"] != "ok"]
    if bad:
        print(f"stages not ok: {', '.join(bad)} (see {args.out}/<stage>.log)")
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser("gpucheck", help="on a GPU: build, kernel tests, benchmarks, memory table -> one report",
                       description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=cmd_gpucheck)


class _Parser(argparse.ArgumentParser):
    """One-line usage errors with exit status 2, as the hvae-fast CLI prints them (cli imports this module)."""

    def error(self, message):
        self.exit(2, f"hvae-fast: error: {message}; see `{self.prog} --help`\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m hvae_fast.gpucheck", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_gpucheck(args)
    except HVAEError as exc:
        print(f"hvae-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
