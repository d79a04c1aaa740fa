"""``--backend auto``: for each op and shape class, the fastest available backend, measured once and cached.

A shape class is (op, device, dtype, numel bucket, K): the bucket is floor(log4(numel)) of the
per-sample [B, *S] tensor, and the head's class also names its mode (mean-std / ratio) and, where
its inputs' dtypes differ (``--precision bf16``: bfloat16 halves, a float32 target), each dtype. The
first call of a class times forward + backward of every available candidate (``ou.AUTO_CANDIDATES``,
which ``ou.get_backend`` hands over: cpp and torch on CPU; triton, cuda and torch on CUDA) on random
inputs of the call's shapes, strides and dtypes (one warm-up, then the median of ``REPEATS`` runs; a
candidate that raises is dropped with a warning), picks the fastest (ties: the candidates' order),
logs the decision once on ``hvae_fast.ops.autotune`` (INFO), and stores it in a JSON file:

    $HVAE_CACHE_DIR/auto-backend.json, else <user cache dir>/hvae-fast/auto-backend.json

with one section per environment (``environment_key``: torch version, the C++ extension's ISA and
sources, triton version, device name), so a new torch or a changed kernel measures again. An
unreadable or corrupt file is replaced, with a warning. ``hvae-fast info`` lists the decisions.

The fused and torch backends draw different noise for one seed, so ``auto`` runs are reproducible
on one machine (where the cache fixes the choice) but may differ between machines. A checkpoint
holds the decisions its run used (``decisions_in_use``) and ``--resume`` pins them
(``pin_decisions``), so a resumed run keeps its backends, and its noise stream, on another machine
or after the cache is deleted, wherever those backends are available.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .backends import Backend, check_ou_args
from ..errors import HVAEError
from ..fsutil import atomic_write_text

log = logging.getLogger("hvae_fast.ops.autotune")

REPEATS = 5
CACHE_NAME = "auto-backend.json"
FORMAT = 1


def cache_path() -> Path:
    """$HVAE_CACHE_DIR/auto-backend.json, else the user cache directory's."""
    env = os.environ.get("HVAE_CACHE_DIR")
    if env:
        return Path(env).expanduser() / CACHE_NAME
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("hvae-fast")) / CACHE_NAME
    except Exception:  # platformdirs is a dependency; never let a cache path crash a run
        return Path.home() / ".cache" / "hvae-fast" / CACHE_NAME


def _sources_hash() -> str:
    from .native import csrc_dir

    src = csrc_dir()
    if src is None:
        return "none"
    h = hashlib.sha1()
    for f in sorted(src.iterdir()):
        if f.suffix in (".cpp", ".h", ".cu"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def environment_key(device) -> str:
    """What a decision depends on besides the shape: torch, the C++ build (ISA, sources), triton, device."""
    from .native import cpu_isa

    device = torch.device(device)
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return f"torch {torch.__version__}; isa {cpu_isa()}; csrc {_sources_hash()}; triton {tv}; {name}"


def shape_class(op: str, device, dtype, numel: int, K: int, mode: str | None = None) -> str:
    """The cache key of a call: e.g. ``gaussian_head[ratio] cpu float32 n=4^7 K=5``."""
    bucket = int(math.log(max(numel, 1), 4) + 1e-9)
    name = op if mode is None else f"{op}[{mode}]"
    return f"{name} {torch.device(device).type} {str(dtype).removeprefix('torch.')} n=4^{bucket} K={K}"


def _valid_decision(rec) -> bool:
    """Whether ``rec`` is a decision as ``AutoBackend.choose`` writes it."""
    return (isinstance(rec, dict) and isinstance(rec.get("choice"), str) and isinstance(rec.get("ms"), dict)
            and all(isinstance(n, str) and isinstance(t, (int, float)) and not isinstance(t, bool)
                    and math.isfinite(t) for n, t in rec["ms"].items()))


class DecisionCache:
    """The JSON file of decisions, one section per environment; ``{key: record}`` for ``env``."""

    def __init__(self, path: Path, env: str):
        self.path, self.env = Path(path), env
        self._lock = threading.Lock()
        self.decisions = self._read().get(env, {})

    def _read(self) -> dict:
        """All sections; a missing file is empty. A file that is not a format-1 cache is reported
        and replaced on the next write; a decision that is not {"choice": str, "ms": {str: number}}
        is reported and dropped (the others are kept), so it is measured again."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the auto-backend cache %s (%s): measuring again", self.path, exc)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT \
                    or not isinstance(data.get("environments"), dict):
                raise ValueError(f"not a format-{FORMAT} auto-backend cache")
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to parse
            log.warning("the auto-backend cache %s is corrupt (%s): rebuilding it", self.path,
                        " ".join(str(exc).split())[:200])
            return {}
        envs, dropped = {}, []
        for env, section in data["environments"].items():
            if not isinstance(section, dict):
                dropped.append(f"section {env!r}")
                continue
            envs[env] = {key: rec for key, rec in section.items() if _valid_decision(rec)}
            dropped += [f"{key!r}" for key in section if key not in envs[env]]
        if dropped:
            log.warning('the auto-backend cache %s is corrupt: %s not {"choice": name, "ms": {name: '
                        'number}}; rebuilding those (the other decisions are kept)', self.path, ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""))
        return envs

    def put(self, key: str, record: dict) -> None:
        with self._lock:
            self.decisions[key] = record
            envs = self._read()  # other processes may have added sections or keys since
            envs.setdefault(self.env, {}).update(self.decisions)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(json.dumps({"format": FORMAT, "environments": envs}, indent=1, sort_keys=True),
                                  self.path)
            except OSError as exc:  # a read-only cache costs a measurement per process, never the run
                log.warning("cannot write the auto-backend cache %s (%s): decisions last this process only",
                            self.path, exc)


def median_time(run: Callable[[], None], device, repeats: int = REPEATS) -> float:
    """Seconds per call of ``run``: one warm-up, then the median of ``repeats`` timed calls."""
    def once():
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(repeats))


def _random(shape, stride, dtype, device, gen: torch.Generator, positive: bool = False) -> torch.Tensor:
    """Random values of the given shape, strides (a channel half stays a strided view), dtype and device."""
    x = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    vals = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
    x.copy_(vals.abs() + 0.1 if positive else vals)
    return x.requires_grad_(True)


def _spec(t: torch.Tensor) -> tuple:
    """(shape, strides, dtype) of an input: the candidates are timed on inputs like the call's."""
    return tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()), t.dtype


def _make_run(op: str, device, specs, K: int, mode, min_scale):
    """make_run(backend) -> one forward + backward of ``op`` on random inputs shaped like ``specs``."""
    def make_run(b):
        gen = torch.Generator().manual_seed(0)
        ins = [_random(shape, stride, dtype, device, gen, positive=(op == "correlated_samples" and i == 2))
               for i, (shape, stride, dtype) in enumerate(specs)]
        if op == "correlated_samples":
            return lambda: b.correlated_samples(*ins, 0.5, K, 1).sum().backward()
        return lambda: b.gaussian_head_logprob(*ins, mode, min_scale).sum().backward()

    return make_run


_INSTANCES: dict = {}


@torch.compiler.assume_constant_result
def _decided(auto_id: int, key: str, op: str, specs: tuple, K: int, mode, min_scale) -> str:
    """The backend name for a call of AutoBackend ``auto_id``: under torch.compile it is computed (measured
    if need be) while tracing and is a constant of the graph, so the chosen op is a graph node like any other."""
    auto = _INSTANCES[auto_id]
    return auto.choose(key, _make_run(op, auto.device, specs, K, mode, min_scale)).name


class AutoBackend:
    """Dispatches each call to the backend decided for its shape class (see the module docstring).

    ``measure(name, run) -> seconds`` times one candidate (default: ``median_time``); tests inject a
    fake one."""

    def __init__(self, device, candidates: dict[str, Backend], cache: DecisionCache,
                 measure: Callable[[str, Callable[[], None]], float] | None = None):
        self.device = torch.device(device)
        self.candidates = candidates
        self.cache = cache
        self.measure = measure or (lambda name, run: median_time(run, self.device))
        self._logged: set = set()
        self._lock = threading.RLock()
        self.used: dict = {}  # shape class -> backend name, as dispatched by this process
        self.pinned: dict = {}  # shape class -> backend name a resumed checkpoint used (pin_decisions)
        _INSTANCES[id(self)] = self  # _decided finds it by an int (a constant under torch.compile)
        self.backend = Backend(name="auto", correlated_samples=self.correlated_samples,
                               gaussian_head_logprob=self.gaussian_head_logprob,
                               correlated_noise=self.correlated_noise, probe=self.probe,
                               devices=(self.device.type,))

    def probe(self, device):
        return True, f"per op and shape class among {', '.join(self.candidates)} (measured, cached in {self.cache.path})"

    def choose(self, key: str, make_run: Callable[[Backend], Callable[[], None]]) -> Backend:
        """The backend for shape class ``key``; measures the candidates (``make_run(b)`` -> one fwd+bwd)
        when neither this process nor the cache has decided it."""
        with self._lock:
            rec, how = self.cache.decisions.get(key), "cached"
            pinned = self.pinned.get(key)
            if pinned in self.candidates:
                rec, how = {"choice": pinned, "ms": {}}, "as the resumed checkpoint"
            elif pinned is not None and key not in self._logged:
                log.warning("OU backend auto: the resumed checkpoint used %s for %s, which is not available here "
                            "(%s): deciding again, so the noise stream changes from here on", pinned, key,
                            ", ".join(self.candidates))
            if rec is None or rec["choice"] not in self.candidates:
                if len(self.candidates) == 1:
                    times = {}
                    choice = next(iter(self.candidates))
                else:
                    times = self._time_candidates(key, make_run)
                    choice = min(times, key=lambda n: (times[n], list(self.candidates).index(n)))
                rec = {"choice": choice, "ms": {n: round(1e3 * t, 4) for n, t in times.items()}}
                self.cache.put(key, rec)
                how = "measured"
            if key not in self._logged:
                self._logged.add(key)
                ms = ", ".join(f"{n} {t:.3g} ms" for n, t in rec["ms"].items()) or "no timing"
                log.info("OU backend auto: %s -> %s (%s; %s)", key, rec["choice"], how, ms)
            self.used[key] = rec["choice"]
            return self.candidates[rec["choice"]]

    def _time_candidates(self, key: str, make_run) -> dict:
        """{name: seconds} of the candidates that ran; one that raises is dropped with a warning."""
        times, failed = {}, []
        for n, b in self.candidates.items():
            try:
                times[n] = float(self.measure(n, make_run(b)))
            except Exception as exc:  # an out-of-memory or a kernel that cannot take this shape: not fatal
                line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                failed.append(f"{n} ({line[:200]})")
                log.warning("OU backend auto: %s failed while timed on %s, dropped: %s", n, key, line[:200])
        if not times:
            raise HVAEError(f"OU backend auto: every candidate failed on {key}: {'; '.join(failed)}; "
                            "pass a named --backend")
        return times

    # -- the three ops of the Backend record --------------------------------------------------

    def correlated_samples(self, z, mu, sigma, rho, K, seed):
        check_ou_args(rho, K)
        shape = tuple(torch.broadcast_shapes(z.shape, mu.shape, sigma.shape))
        dtype = torch.promote_types(torch.promote_types(z.dtype, mu.dtype), sigma.dtype)
        key = shape_class("correlated_samples", self.device, dtype, math.prod(shape), int(K))
        contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        name = _decided(id(self), key, "correlated_samples", ((shape, contiguous, dtype),) * 3, int(K),
                        None, None)
        return self.candidates[name].correlated_samples(z, mu, sigma, rho, K, seed)

    def gaussian_head_logprob(self, mean_raw, scale_raw, target, mode="mean-std", min_scale=1e-3):
        first = self.candidates[next(iter(self.candidates))]
        if mean_raw.dim() < 2 or target.dim() < 1:  # the backend raises its own shape error
            return first.gaussian_head_logprob(mean_raw, scale_raw, target, mode, min_scale)
        K = int(mean_raw.shape[0])
        # under --precision bf16/fp16 the net's halves come in that dtype, the latent target in float32
        dtypes = [str(t.dtype).removeprefix("torch.") for t in (mean_raw, scale_raw, target)]
        dtype = dtypes[0] if len(set(dtypes)) == 1 else "/".join(dtypes)
        key = shape_class("gaussian_head", self.device, dtype, target.numel(), K, mode)
        specs = (_spec(mean_raw), _spec(scale_raw), _spec(target))
        name = _decided(id(self), key, "gaussian_head", specs, K, mode, float(min_scale))
        return self.candidates[name].gaussian_head_logprob(mean_raw, scale_raw, target, mode, min_scale)

    def correlated_noise(self, seed, K, shape, device=None, **kw):
        """The eps that ``correlated_samples`` uses for a float32 call of this shape and K."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        key = shape_class("correlated_samples", self.device, torch.float32, math.prod(shape), int(K))
        if key not in self.used:
            z = torch.zeros(shape, device=self.device)
            self.correlated_samples(z, z, z + 1, 0.5, K, 0)  # decides this shape class
        return self.candidates[self.used[key]].correlated_noise(seed, K, shape, device or self.device, **kw)


_AUTO: dict = {}  # device -> the AutoBackend of get_backend("auto", device)


def auto_backend(device, candidates: dict[str, Backend]) -> Backend:
    """The ``auto`` backend of ``device`` (one per device and process) over ``candidates`` {name:
    available backend}, in tie-breaking order; its decisions are cached in ``cache_path()``."""
    device = torch.device(device)
    key = str(device)
    if key not in _AUTO:
        cache = DecisionCache(cache_path(), environment_key(device))
        _AUTO[key] = AutoBackend(device, dict(candidates), cache)
        log.info("OU backend: auto on %s, per op and shape class among %s (cache %s)", device.type,
                 ", ".join(candidates), cache.path)
    return _AUTO[key].backend


def decisions_in_use(device) -> dict:
    """{shape class: backend name} that ``auto`` on ``device`` has dispatched to in this process
    ({} when auto is not in use): a checkpoint stores it so that a resumed run keeps its noise stream."""
    auto = _AUTO.get(str(torch.device(device)))
    return dict(auto.used) if auto is not None else {}


def pin_decisions(device, decisions: dict) -> None:
    """Make ``auto`` on ``device`` dispatch each shape class of ``decisions`` (a resumed checkpoint's
    ``decisions_in_use``) to the backend it names, ahead of the cache, where that backend is available."""
    auto = _AUTO.get(str(torch.device(device)))
    if auto is not None and decisions:
        with auto._lock:
            auto.pinned.update(decisions)


def cached_decisions(device="cpu") -> tuple[Path, str, dict]:
    """(cache file, this environment's key, its decisions {shape class: record}) for ``hvae-fast info``."""
    path = cache_path()
    env = environment_key(device)
    return path, env, DecisionCache(path, env).decisions
