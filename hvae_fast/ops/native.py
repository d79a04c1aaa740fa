"""The C++ (CPU, OpenMP + SIMD) and CUDA backends of the two OU ops, built on first use.

The extensions are compiled with ``torch.utils.cpp_extension.load`` the first time a backend is
probed or used (once per process; later processes reuse the build from the cache directory):

* cache: ``$HVAE_BUILD_DIR`` if set, else
  ``platformdirs.user_cache_dir("hvae-fast")/build/<torch version>-<python tag>``; one
  sub-directory per extension. Torch's extension versioning rebuilds when a source or a flag
  changes. Builds into one directory are serialised by our flock on ``.hvae-build.lock`` there
  (``build_lock``), held for the whole ``load``: torch's own ``lock`` file (a FileBaton, which
  waits forever for a file a killed build left) is then never live when we look, so one found
  there is removed with a warning.
* flags: ``-O3 -fopenmp -fno-math-errno -fno-trapping-math``, plus ``-mavx2 -mfma`` when the CPU
  that builds has AVX2 and FMA (``cpu_isa()``: /proc/cpuinfo flags, else torch's CPU capability;
  ``HVAE_CPU_ISA=baseline`` forces the portable SSE2 build). The C++ extension's build directory
  is keyed on that choice (``<cache>/hvae_fast_ou_cpu-avx2`` or ``-baseline``), so a cached AVX2
  build is never loaded by a CPU without AVX2 even when the cache is shared between machines. No
  ``-march=native``: nothing beyond AVX2/FMA is assumed. The float32 inner loops (Philox lanes,
  polynomial exp / log / cos) are written for auto-vectorisation (``omp simd``).
* sources: ``csrc/`` next to this package (installed layout) or at the repository root (checkout).
  The C++ backend is ``ou_cpu.cpp`` (bindings) + ``ou_cpu_kernels.cpp`` (kernels), with the headers
  ``cpu_vec_math.h`` (float32 math), ``cpu_philox.h`` (vectorised noise) and ``philox.h``; the
  test-only functions live in ``ou_cpu_testing.cpp``, a second extension (``CPU_TEST_EXT``) that
  only the tests build. Every process runs torch's ninja build, which recompiles what a changed
  source, header (ninja's depfiles) or source list touches, and is a no-op otherwise.
* the CUDA extension is built only when torch has CUDA (``torch.version.cuda``) and a device is
  present.

A build that fails (no compiler, no ninja, a compile error) never raises: it is logged once on
``hvae_fast.ops.native`` with the first lines of the compiler's message, and the backend's ``probe``
answers ``(False, reason)``. ``build_all(verbose)`` builds everything eagerly (``hvae-fast build``).

Noise: element (k, j) of the [K, *S] noise is Triton's ``tl.randn(seed, k * N + j)``
(Philox4x32-10, csrc/philox.h), so the C++, CUDA and Triton backends draw the same eps for a seed
(the Philox integers bit for bit; the C++ backend's float32 Box-Muller uses vectorised polynomial
log / cos, within 1e-6 of Triton's, see tests/test_native.py; the shared backend suite is
tests/test_backends.py).

Operators: the four kernels are ``torch.ops.hvae_fast.{correlated_samples,gaussian_head}_{fwd,bwd}``
(schemas in csrc/ou_cpu.cpp's TORCH_LIBRARY, CPU kernels there, CUDA kernels under the same names in
csrc/ou_cuda.cpp); their fake kernels and autograd are registered once, below, so torch.compile keeps
them as graph nodes. Seeds and noise offsets follow backends.py (``check_seed``, ``check_offsets``).

CPU threading: the C++ kernels run on torch's intra-op pool (``at::parallel_for``, so
``torch.set_num_threads`` applies) and stay on the calling thread below ~32k normals / ~128k head
elements, where a parallel region costs more than it saves (and a whole time slice on a busy machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from ..errors import HVAEError
from ..fsutil import flock_waiting, write_pid
from .backends import OU_TARGETS, Backend, check_offsets, check_ou_args, check_seed, head_saved_inputs, packed_rows

log = logging.getLogger("hvae_fast.ops.native")

_ERROR_LINES = 12  # lines of compiler output kept in the warning and the probe's reason
BUILD_LOCK = ".hvae-build.lock"  # our flock, held around every build into a build directory
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory


# ----------------------------------------------------------------------------------------------
# Locating sources and the cache
# ----------------------------------------------------------------------------------------------

def csrc_dir() -> Path | None:
    """The directory that holds philox.h and the kernels (installed package first, then checkout)."""
    package = Path(__file__).resolve().parent.parent  # hvae_fast/
    for cand in (package / "csrc", package.parent / "csrc"):
        if (cand / "philox.h").is_file():
            return cand
    return None


def build_root() -> Path:
    """Per-user build cache: $HVAE_BUILD_DIR, else <user cache>/hvae-fast/build/<torch>-<python>."""
    env = os.environ.get("HVAE_BUILD_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("hvae-fast"))
    except Exception:  # platformdirs is a dependency, but never let the cache path crash a run
        base = Path.home() / ".cache" / "hvae-fast"
    tag = f"{torch.__version__}-cp{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return base / "build" / tag


def _summarise(exc: BaseException) -> tuple[str, str]:
    """(one-line reason, first lines of the compiler's message) for a failed build."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    diags = [ln for ln in lines if "error:" in ln.lower() or "error " in ln.lower()[:12]]
    diags = [ln for ln in diags if not ln.startswith("Error building extension")] or lines
    head = lines[0] if lines else text
    if len(head) > 200:  # torch's first line carries the whole compiler command
        head = head[:200] + " ..."
    detail = "\n".join([head] + [ln for ln in diags[:_ERROR_LINES] if ln != lines[0]])
    reason = diags[0] if diags and diags[0] != lines[0] else head
    return reason.strip(), detail


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Hold our flock on ``build_dir/BUILD_LOCK`` for the body, waiting for another process's build
    there; then remove a torch ``lock`` file left in ``build_dir``, which only a killed build leaves.

    Torch's FileBaton waits, silently and forever, for its ``lock`` file to go away, so the next build
    after a kill during compilation would hang. Every build here runs under our flock, so a
    ``lock`` found while we hold it belongs to no live build."""
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / BUILD_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        flock_waiting(fd, lambda pid: log.info("waiting for %s to finish building in %s",
                                               f"process {pid}" if pid.isdigit() else "another process", build_dir))
        write_pid(fd)
        stale = build_dir / TORCH_LOCK
        if os.path.lexists(stale):
            log.warning("removing %s, left by a build of the C++ kernels that was killed (torch would wait for "
                        "it forever)", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # drops the flock


_ISA_FLAGS = {"avx2": ["-mavx2", "-mfma"], "baseline": []}


def cpu_isa() -> str:
    """The instruction set the C++ extension is built for on this CPU: "avx2" (AVX2 + FMA) or "baseline".

    ``HVAE_CPU_ISA`` (``avx2`` / ``baseline``) overrides; otherwise the CPU's flags in /proc/cpuinfo
    decide, and where that file is missing torch's detected CPU capability (AVX2 or AVX512)."""
    env = os.environ.get("HVAE_CPU_ISA", "").strip().lower()
    if env in _ISA_FLAGS:
        return env
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx2" if {"avx2", "fma"} <= flags else "baseline"
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        cap = ""
    return "avx2" if cap in ("AVX2", "AVX512") else "baseline"


class NativeExtension:
    """One lazily built extension. ``get()`` returns the module or None; ``reason`` says why not."""

    def __init__(self, name: str, sources: tuple[str, ...], cuda: bool = False, src_dir: Path | None = None,
                 build_dir: Path | None = None, defines_ops: bool = False, needs: "NativeExtension | None" = None):
        self.name = name
        self.defines_ops = defines_ops  # holds TORCH_LIBRARY(hvae_fast): register fakes + autograd on load
        self.needs = needs  # the extension whose TORCH_LIBRARY this one's TORCH_LIBRARY_IMPL fills
        self.sources = sources
        self.cuda = cuda
        self._src_dir = src_dir
        self._build_dir = build_dir
        self._lock = threading.Lock()
        self._tried = False
        self.module = None
        self.reason = "not built yet"

    def _precheck(self) -> str | None:
        if self.cuda:
            if not torch.version.cuda:
                return "this torch build has no CUDA support"
            if not torch.cuda.is_available():
                return "no CUDA device available"
        if self.needs is not None and self.needs.get() is None:
            return f"it needs the {self.needs.name} extension (the op schemas): {self.needs.reason}"
        return None

    def get(self, verbose: bool = False):
        if self._tried:
            return self.module
        with self._lock:
            if not self._tried:
                self._build(verbose)
                self._tried = True
        return self.module

    def _build(self, verbose: bool) -> None:
        why = self._precheck()
        if why is not None:
            self.reason = why
            return
        src = self._src_dir or csrc_dir()
        if src is None:
            self.reason = "C++ sources (csrc/) not found next to the hvae_fast package"
            log.warning("hvae-fast %s extension unavailable: %s", self.name, self.reason)
            return
        paths = [src / s for s in self.sources]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            self.reason = f"missing sources: {', '.join(missing)}"
            log.warning("hvae-fast %s extension unavailable: %s", self.name, self.reason)
            return
        isa = None if self.cuda else cpu_isa()
        build_dir = self._build_dir or (build_root() / (self.name if isa is None else f"{self.name}-{isa}"))
        try:
            from torch.utils import cpp_extension

            cpu_flags = ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"] + _ISA_FLAGS.get(isa, [])
            kwargs = dict(
                name=self.name,
                sources=[str(p) for p in paths],
                extra_cflags=["-O3"] + ([] if self.cuda else cpu_flags),
                extra_ldflags=[] if self.cuda else ["-fopenmp"],
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
            if self.cuda:
                kwargs["extra_cuda_cflags"] = ["-O3"]
            with build_lock(build_dir):
                if not any(build_dir.glob(f"{self.name}*.so")):  # nothing built yet: say why the start stalls
                    log.info("compiling the %s kernels, once, %s (into %s)", "CUDA" if self.cuda else "C++",
                             "a few minutes" if self.cuda else "about a minute", build_dir)
                self.module = cpp_extension.load(**kwargs)
            if self.defines_ops:
                _register_ops()
            self.reason = f"built in {build_dir}" + ("" if isa is None else f", {isa}")
        except BaseException as exc:  # compile errors, missing ninja/compiler, SystemExit from a tool
            if isinstance(exc, KeyboardInterrupt):
                raise
            reason, detail = _summarise(exc)
            self.module = None
            self.reason = f"build of the {self.name} extension failed: {reason}"
            log.warning("hvae-fast %s extension could not be built (falling back to other backends):\n%s",
                        self.name, detail)

    def probe(self) -> tuple[bool, str]:
        mod = self.get()
        if mod is None:
            return False, self.reason
        return True, self.reason


CPU_SOURCES = ("ou_cpu.cpp", "ou_cpu_kernels.cpp")  # headers: cpu_vec_math.h, cpu_philox.h, philox.h
CPU_EXT = NativeExtension("hvae_fast_ou_cpu", CPU_SOURCES, defines_ops=True)
# Test-only entry points (raw Philox, vm accuracy) over the same kernels and flags; only tests build it.
CPU_TEST_EXT = NativeExtension("hvae_fast_ou_cpu_testing", ("ou_cpu_testing.cpp", "ou_cpu_kernels.cpp"))
CUDA_EXT = NativeExtension("hvae_fast_ou_cuda", ("ou_cuda.cpp", "ou_cuda_kernels.cu"), cuda=True, needs=CPU_EXT)


def build_all(verbose: bool = False) -> dict[str, tuple[bool, str]]:
    """Build (or load from the cache) every extension this machine can run; {name: (ok, reason)}."""
    out = {}
    for key, ext in (("cpp", CPU_EXT), ("cuda", CUDA_EXT)):
        ext.get(verbose=verbose)
        out[key] = ext.probe()
    return out


def _module(ext: NativeExtension):
    mod = ext.get()
    if mod is None:
        raise HVAEError(f"the {ext.name} extension is not available: {ext.reason}. Pass --backend torch")
    return mod


# ----------------------------------------------------------------------------------------------
# The ops: torch.ops.hvae_fast.* (schemas and CPU kernels in csrc/ou_cpu.cpp, CUDA kernels in
# csrc/ou_cuda.cpp); their fake kernels and autograd are registered here, once, after the C++
# extension that defines them has loaded (as pytorch/extension-cpp's ops.py does).
# ----------------------------------------------------------------------------------------------

def _compute_dtype(ext: NativeExtension, dtype: torch.dtype) -> torch.dtype:
    if ext.cuda:
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_device(ext: NativeExtension, *tensors) -> None:
    want = "cuda" if ext.cuda else "cpu"
    for t in tensors:
        if t.device.type != want:
            raise HVAEError(f"the {'cuda' if ext.cuda else 'cpp'} OU backend runs on {want} tensors, got {t.device}")


def _head_acc(t: torch.Tensor) -> torch.dtype:
    """dtype of the head's [B] output and saved averages: float32 on CUDA, the input's on CPU."""
    return torch.float32 if t.device.type == "cuda" else t.dtype


def _fake_cs_fwd(z, mu, sigma, rho, K, seed, offset_base):
    return z.new_empty((K, *z.shape))


def _fake_cs_bwd(grad, rho, K, seed, offset_base, need_sigma):
    return tuple(grad.new_empty(grad.shape[1:]) for _ in range(3))


def _fake_head_fwd(mean_raw, scale_raw, target, ratio, min_scale):
    acc = _head_acc(target)
    return (target.new_empty(target.shape[:1], dtype=acc), target.new_empty(target.shape, dtype=acc),
            target.new_empty(target.shape, dtype=acc))


def _fake_head_bwd(grad, mean_raw, scale_raw, target, mu_bar, sigma_bar, ratio, min_scale):
    # CPU mean-std: one [B, *S] d mean_raw for all k (the autograd formula expands it over K); the
    # gradients are contiguous whatever the strides of the (possibly strided) inputs
    dmr_shape = mean_raw.shape if (ratio or target.device.type == "cuda") else target.shape
    return target.new_empty(dmr_shape), target.new_empty(scale_raw.shape), torch.empty_like(target)


def _cs_setup(ctx, inputs, output):
    _, _, _, ctx.rho, ctx.K, ctx.seed, ctx.offset_base = inputs


def _cs_backward(ctx, grad):
    need = ctx.needs_input_grad
    dz, dmu, dsigma = torch.ops.hvae_fast.correlated_samples_bwd(grad.contiguous(), ctx.rho, ctx.K, ctx.seed,
                                                                 ctx.offset_base, need[2])
    return dz if need[0] else None, dmu if need[1] else None, dsigma if need[2] else None, None, None, None, None


def _head_setup(ctx, inputs, output):
    mean_raw, scale_raw, target, ctx.ratio, ctx.min_scale = inputs
    _, mbar, sbar = output
    ctx.save_for_backward(*head_saved_inputs(mean_raw, scale_raw, ctx.ratio), target, mbar, sbar)


def _head_backward(ctx, grad, _grad_mbar, _grad_sbar):
    mean_raw, scale_raw, target, mbar, sbar = ctx.saved_tensors
    g = grad.to(mbar.dtype).contiguous()
    # the kernels do not read mean_raw in the mean-std mode: scale_raw stands in for the argument
    dmr, dsr, dt = torch.ops.hvae_fast.gaussian_head_bwd(g, mean_raw if ctx.ratio else scale_raw, scale_raw, target,
                                                          mbar, sbar, ctx.ratio, ctx.min_scale)
    if dmr.dim() == target.dim():  # mean-std mode (C++): one [B, *S] for all k, expanded like torch's mean
        dmr = dmr.unsqueeze(0).expand_as(scale_raw)
    need = ctx.needs_input_grad
    return dmr if need[0] else None, dsr if need[1] else None, dt if need[2] else None, None, None


_ops_registered = False


def _register_ops() -> None:
    """Fake kernels and autograd of the four torch.ops.hvae_fast ops; once, after their schemas exist."""
    global _ops_registered
    if _ops_registered:
        return
    _ops_registered = True
    lib = torch.library
    lib.register_fake("hvae_fast::correlated_samples_fwd")(_fake_cs_fwd)
    lib.register_fake("hvae_fast::correlated_samples_bwd")(_fake_cs_bwd)
    lib.register_fake("hvae_fast::gaussian_head_fwd")(_fake_head_fwd)
    lib.register_fake("hvae_fast::gaussian_head_bwd")(_fake_head_bwd)
    lib.register_autograd("hvae_fast::correlated_samples_fwd", _cs_backward, setup_context=_cs_setup)
    lib.register_autograd("hvae_fast::gaussian_head_fwd", _head_backward, setup_context=_head_setup)


def _make_ops(ext: NativeExtension):
    def correlated_samples(z, mu, sigma, rho, K, seed, *, offset_base: int = 0):
        check_ou_args(rho, K)
        seed = seed if torch.compiler.is_compiling() else check_seed(seed)
        _check_device(ext, z, mu, sigma)
        z, mu, sigma = torch.broadcast_tensors(z, mu, sigma)
        check_offsets(K, z.numel(), offset_base)
        dtype = _compute_dtype(ext, torch.promote_types(torch.promote_types(z.dtype, mu.dtype), sigma.dtype))
        orig = z.dtype
        z, mu, sigma = (t.to(dtype).contiguous() for t in (z, mu, sigma))
        _module(ext)
        out = torch.ops.hvae_fast.correlated_samples_fwd(z, mu, sigma, float(rho), int(K), seed, int(offset_base))
        return out if out.dtype == orig else out.to(orig)

    def gaussian_head_logprob(mean_raw, scale_raw, target, mode="mean-std", min_scale=1e-3):
        if mode not in OU_TARGETS:
            raise HVAEError(f"unknown OU target {mode!r}: choose one of {', '.join(OU_TARGETS)}")
        _check_device(ext, mean_raw, scale_raw, target)
        if target.dim() < 1:
            raise HVAEError("gaussian_head_logprob: target needs a batch dimension")
        if mean_raw.shape != scale_raw.shape or mean_raw.dim() != target.dim() + 1 \
                or mean_raw.shape[1:] != target.shape or mean_raw.shape[0] < 1:
            raise HVAEError(
                f"gaussian_head_logprob: mean_raw and scale_raw must have shape [K, *target.shape] with K >= 1, "
                f"got {tuple(mean_raw.shape)}, {tuple(scale_raw.shape)} for target {tuple(target.shape)}"
            )
        dtype = _compute_dtype(ext, torch.promote_types(torch.promote_types(mean_raw.dtype, scale_raw.dtype),
                                                        target.dtype))
        # mean_raw / scale_raw are read in place (the model's halves of one [K, B, 2C, ...] tensor)
        mean_raw, scale_raw = (t.to(dtype) if packed_rows(t) else t.to(dtype).contiguous() for t in (mean_raw, scale_raw))
        target = target.to(dtype).contiguous()
        # float32 and float64 inputs give a [B] of their own dtype; float16 / bfloat16 give float32
        _module(ext)
        return torch.ops.hvae_fast.gaussian_head_fwd(mean_raw, scale_raw, target, mode == "ratio", float(min_scale))[0]

    def correlated_noise(seed, K, shape, device=None, *, offset_base: int = 0):
        shape = tuple(int(s) for s in (shape if not isinstance(shape, int) else (shape,)))
        n = 1
        for s in shape:
            n *= s
        K = int(K)
        if K < 0:
            raise HVAEError(f"K must be >= 0, got {K}")
        check_offsets(K, n, offset_base)
        seed = check_seed(seed)
        mod = _module(ext)
        if ext.cuda:
            dev = torch.device(device) if device is not None else torch.device("cuda")
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            flat = mod.noise(seed, K, n, int(offset_base), index)
        else:
            flat = mod.noise(seed, K, n, int(offset_base))
        return flat.view(K, *shape)

    def probe(device):
        device = torch.device(device)
        if device.type != ("cuda" if ext.cuda else "cpu"):
            return False, f"does not run on {device.type}"
        ok, why = ext.probe()
        if ok and not ext.cuda:
            why = f"C++/OpenMP extension, {ext.module.num_threads()} threads ({why})"
        elif ok:
            why = f"CUDA extension ({why})"
        return ok, why

    return correlated_samples, gaussian_head_logprob, correlated_noise, probe


def _backend(name: str, ext: NativeExtension, devices: tuple) -> Backend:
    cs, gh, noise, probe = _make_ops(ext)
    return Backend(name=name, correlated_samples=cs, gaussian_head_logprob=gh, correlated_noise=noise, probe=probe,
                   devices=devices)


BACKENDS = [
    _backend("cpp", CPU_EXT, ("cpu",)),
    _backend("cuda", CUDA_EXT, ("cuda",)),
]
