"""Benchmark-suite settings: `pytest bench/ --benchmark-only` (from the repo root) on CPU or GPU.

* Collects ``bench/bench_*.py`` (the default ``pytest`` run only sees ``tests/``: pyproject's
  ``testpaths``), with ``test_*`` functions inside.
* Device: CUDA when torch sees one, else CPU; ``HVAE_BENCH_DEVICE=cpu`` (or ``cuda``/``cuda:1``)
  overrides. ``HVAE_BENCH_THREADS=N`` sets torch's CPU threads (default: torch's own choice).
* Parametrisation over OU implementations happens here, once, at collection time: every backend
  ``hvae_fast.ops.ou.backend_status`` knows of is listed and the unavailable ones are skipped with the
  probe's reason; torch.compile is tried once on a tiny function and skipped with the error if it
  fails on this machine.
* Results: unless ``--benchmark-json PATH`` is passed, the JSON report goes to
  ``bench/results/<device-kind>-latest.json`` (``cpu-latest.json``, ``cuda-H100-latest.json``);
  ``HVAE_BENCH_JSON=PATH`` redirects it, ``HVAE_BENCH_JSON=none`` turns it off. The JSON is
  pytest-benchmark's, plus a top-level ``"hvae_fast"`` object (device, versions, backend status,
  threads, load average, GPU copy bandwidth). ``python -m hvae_fast.reporting.bench FILE`` summarises it.
* Rounds: ``HVAE_BENCH_SCALE`` (default 1.0) multiplies every round count / time budget.
* Quick mode: ``HVAE_BENCH_QUICK=1`` (CI) checks that every benchmark runs, not how fast: tiny op
  sizes, the CIFAR step at batch 2, a few rounds, torch.compile skipped (it compiles for minutes),
  and the JSON goes to a temporary file (``$TMPDIR/hvae-bench-quick-<pid>.json``) unless
  ``HVAE_BENCH_JSON`` says otherwise, so bench/results/ is never touched.
* pytest-benchmark >= 4 (the option ``--benchmark-json`` became a path in 5.3; both kinds are fed).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hvae_fast.ops.backends import required

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

if os.environ.get("HVAE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["HVAE_BENCH_THREADS"]))

SCALE = float(os.environ.get("HVAE_BENCH_SCALE", "1.0"))
QUICK = os.environ.get("HVAE_BENCH_QUICK", "").strip() == "1"


def _pick_device() -> torch.device:
    want = os.environ.get("HVAE_BENCH_DEVICE", "").strip()
    if want:
        return torch.device(want)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


DEVICE = _pick_device()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_kind(device: torch.device = DEVICE) -> str:
    """``cpu`` or ``cuda-<short GPU name>`` (``cuda-H100``, ``cuda-A100``, ``cuda-RTX4090``)."""
    if device.type != "cuda":
        return device.type
    toks = [t for t in device_name(device).replace("NVIDIA", " ").split() if t not in ("GeForce", "Tesla", "Quadro")]
    if not toks:
        return "cuda"
    short = toks[0].split("-")[0]
    if short.upper() in ("RTX", "GTX") and len(toks) > 1:
        short += toks[1]
    return "cuda-" + (re.sub(r"[^A-Za-z0-9]", "", short) or "gpu")


def sync(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Collection: bench_*.py files, implementation parameters with skip reasons
# ---------------------------------------------------------------------------------------------

def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and BENCH_DIR in file_path.resolve().parents
            and not parent.session.isinitpath(file_path)):  # an explicit path is collected by pytest itself
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    # Explicitly named bench_*.py files are collected by pytest's python plugin; nothing to do.
    if not config.option.collectonly:
        _install_default_json(config)


FUSED = ("triton", "cuda", "cpp")
_STATUS: dict = {}


def backend_status() -> dict:
    """{name: (available, reason)} for DEVICE, computed once per session (probing may compile)."""
    if not _STATUS:
        from hvae_fast.ops.ou import backend_status as status

        _STATUS.update(status(DEVICE))
    return _STATUS


def fused_skip_reason(name: str) -> str | None:
    if name == "triton" and DEVICE.type == "cpu":
        return "triton runs on CPU only under TRITON_INTERPRET=1, far too slow to benchmark"
    ok, why = backend_status().get(name, (False, "unknown backend"))
    if not ok and name in ("cpp", "cuda") and required(name):  # gpucheck on a GPU: no silent skip
        raise pytest.UsageError(f"the {name} backend is unavailable with HVAE_REQUIRE_{name.upper()}=1: {why}")
    return None if ok else f"{name} backend unavailable on {DEVICE.type}: {why}"


_COMPILE: dict = {}


def torch_compile_status() -> tuple[bool, str]:
    """Try torch.compile once (a tiny forward + backward on DEVICE); (ok, reason)."""
    if not _COMPILE:
        t0 = time.perf_counter()
        try:
            import torch.nn.functional as F

            fn = torch.compile(lambda a, b: (F.softplus(b) * a + 1.0).sum(), dynamic=False)
            a = torch.randn(8, 3, device=DEVICE, requires_grad=True)
            fn(a, torch.randn(8, 3, device=DEVICE)).backward()
            sync()
            _COMPILE["status"] = (True, f"torch.compile works here (probe took {time.perf_counter() - t0:.1f}s)")
        except Exception as exc:  # no C++ compiler, no triton for the GPU, ...
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _COMPILE["status"] = (False, f"torch.compile fails on this machine: {type(exc).__name__}: {msg[:300]}")
    return _COMPILE["status"]


def _impl_params(names):
    out = []
    for name in names:
        reason = None
        if name == "torch-compile":
            if QUICK:
                reason = "HVAE_BENCH_QUICK=1: torch.compile takes minutes to compile, skipped in quick mode"
            else:
                ok, why = torch_compile_status()
                reason = None if ok else why
        elif name.removeprefix("hvae-").removesuffix("-recompute") in FUSED:
            reason = fused_skip_reason(name.removeprefix("hvae-").removesuffix("-recompute"))
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def pytest_generate_tests(metafunc):
    # Op level: eager torch, torch.compile of the reference, then each fused backend.
    if "op_impl" in metafunc.fixturenames:
        metafunc.parametrize("op_impl", _impl_params(("torch", "torch-compile") + FUSED + ("auto",)))
    # Step level: the plain VAE, the HVAE on the torch backend, the HVAE on each fused backend.
    if "step_variant" in metafunc.fixturenames:
        # `-recompute`: the K-sample generator activations are rebuilt in backward (--ou-recompute).
        # `hvae-auto`: --backend auto (per op and shape class, the measured fastest: hvae_fast/ops/autotune.py).
        variants = (("vae", "hvae-torch", "hvae-auto") + tuple(f"hvae-{b}" for b in FUSED)
                    + ("hvae-torch-recompute",))
        metafunc.parametrize("step_variant", _impl_params(variants))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def bench_scale() -> float:
    return SCALE


@pytest.fixture(autouse=True)
def _common_extra_info(request):
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        bm.extra_info.update(device=str(DEVICE), device_kind=device_kind(), device_name=device_name())
    yield


def _nominal_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """Theoretical DRAM bandwidth in bytes/s from the device properties (2 x clock x bus width)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, "2 x memory_clock_rate x memory_bus_width (device properties)"
    table = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
             "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12, "A10": 0.6e12,
             "T4": 0.32e12, "V100": 0.9e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12}
    name = torch.cuda.get_device_name(device)
    for key, bw in table.items():  # most specific keys first
        if key in name:
            return bw, f"datasheet value for {key}"
    return None, "unknown GPU: no nominal bandwidth"


@pytest.fixture(scope="session")
def gpu_bandwidth(bench_device):
    """On CUDA: {nominal, copy} bandwidth in bytes/s (copy = a 2 x 512 MiB device-to-device copy)."""
    if bench_device.type != "cuda":
        return None
    if "gpu_bandwidth" in SESSION_INFO:
        return SESSION_INFO["gpu_bandwidth"]
    n = 128 * 1024 * 1024  # floats: 512 MiB
    x = torch.empty(n, device=bench_device).uniform_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    copy_bw = 2 * x.nbytes / times[len(times) // 2]
    del x, y
    torch.cuda.empty_cache()
    nominal, how = _nominal_bandwidth(bench_device)
    SESSION_INFO["gpu_bandwidth"] = info = {"nominal_Bps": nominal, "nominal_source": how, "copy_Bps": copy_bw,
                                            "reference_Bps": nominal or copy_bw,
                                            "reference": "nominal" if nominal else "measured copy"}
    return info


# ---------------------------------------------------------------------------------------------
# Results: default JSON path, run metadata
# ---------------------------------------------------------------------------------------------

SESSION_INFO: dict = {}


class _AtomicJSONOut:
    """pytest-benchmark < 5.3: stands in for the file ``--benchmark-json`` opens (argparse.FileType);
    written to PATH.tmp, renamed on close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path.with_name(self.path.name + ".tmp"), "wb")
        return self._fh

    def __exit__(self, exc_type, exc, tb):
        self._fh.close()
        tmp = Path(self._fh.name)
        if exc_type is None:
            os.replace(tmp, self.path)
        else:
            tmp.unlink(missing_ok=True)
        return False

    def __str__(self):
        try:
            return str(self.path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)


def _default_json_path() -> Path | None:
    env = os.environ.get("HVAE_BENCH_JSON", "").strip()
    if env.lower() in ("none", "off", "0", "no"):
        return None
    if env:
        return Path(env)
    if QUICK:
        return Path(tempfile.gettempdir()) / f"hvae-bench-quick-{os.getpid()}.json"
    return RESULTS_DIR / f"{device_kind()}-latest.json"


def _json_option_is_path() -> bool:
    """pytest-benchmark >= 5.3 parses ``--benchmark-json`` as a Path and opens it itself; 4.x to 5.2
    parse it with argparse.FileType and write through ``with option_value as fh``."""
    from importlib.metadata import version

    major_minor = tuple(int(x) for x in re.findall(r"\d+", version("pytest-benchmark"))[:2])
    return major_minor >= (5, 3)


def _install_default_json(config) -> None:
    if config.getoption("benchmark_json", None) is not None:
        return
    path = _default_json_path()
    if path is None:
        return
    if _json_option_is_path():
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path
    else:
        out = _AtomicJSONOut(path)
    config.option.benchmark_json = out
    bs = getattr(config, "_benchmarksession", None)  # created by pytest-benchmark's pytest_configure
    if bs is not None and getattr(bs, "json", None) is None:
        bs.json = out


def pytest_configure(config):
    # Runs before pytest-benchmark's (trylast) pytest_configure reads the option.
    if config.pluginmanager.hasplugin("benchmark") and not config.option.collectonly:
        _install_default_json(config)
    SESSION_INFO["loadavg_start"] = _loadavg()
    SESSION_INFO["t_start"] = time.time()


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    import hvae_fast

    v = {"torch": torch.__version__, "python": sys.version.split()[0], "hvae_fast": hvae_fast.__version__,
         "platform": platform.platform()}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception as exc:
        v["triton"] = f"unavailable ({type(exc).__name__})"
    if DEVICE.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version()
    try:
        import pytest_benchmark

        v["pytest_benchmark"] = pytest_benchmark.__version__
    except Exception:
        pass
    return v


def run_info() -> dict:
    info = {
        "device": str(DEVICE),
        "device_kind": device_kind(),
        "device_name": device_name(),
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": SESSION_INFO.get("loadavg_start"),
        "loadavg_end": _loadavg(),
        "wall_s": round(time.time() - SESSION_INFO.get("t_start", time.time()), 1),
        "backend_status": {k: list(v) for k, v in backend_status().items()},
        "torch_compile": list(_COMPILE["status"]) if _COMPILE else None,
        "scale": SCALE,
        "quick": QUICK,
        "args": sys.argv[1:],
    }
    if DEVICE.type == "cuda":
        info["gpu_bandwidth"] = SESSION_INFO.get("gpu_bandwidth")
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["hvae_fast"] = {"device": str(DEVICE), "device_name": device_name(), "versions": _versions()}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["hvae_fast"] = run_info()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    la = _loadavg()
    if bs is not None and bs.benchmarks and la and os.cpu_count() and la[0] > os.cpu_count() * 1.25 and DEVICE.type == "cpu":
        terminalreporter.write_line(
            f"hvae bench: load average {la} on {os.cpu_count()} cores while benchmarking: CPU timings are noisy",
            yellow=True)
