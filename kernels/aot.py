"""Ahead-of-time compile of every Triton kernel variant the launchers produce, for sm_80 / sm_90, no GPU.

``variants()`` runs each launcher (the ``triton_op`` bodies and ``correlated_noise``) over a grid
of inputs (``_cases``: dtypes, head modes and layouts, K = 1, a tiny and a README size, 32- and
64-bit seeds and offsets) with the kernel launch captured instead of run, and keeps one call per
distinct compile key (kernel, argument types and specialisations, constexprs, warps): a new variant
of a launcher is covered without listing it. ``compile_variant`` compiles one for a ``GPUTarget``
with Triton's compiler and bundled ptxas (its ``-v`` log: registers, stack frame and spill bytes per
thread) and reads the cubin with the bundled cuobjdump: static SASS instruction counts (the whole
kernel, and the body of the loop over k where there is one) and the global load / store bytes a
thread issues (``LDG`` / ``STG`` widths); shared memory (bytes per program) from Triton's metadata.

Needs compiled Triton (TRITON_INTERPRET unset before the kernels are imported): run it as
``python -m hvae_fast.kernels.aot [--json]`` (a subprocess, from the tests and ``hvae-fast info
--kernels``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

ARCHS = (80, 90)
# What the launchers assume: at least this many resident warps per SM (a quarter of the 64 an A100 /
# H100 SM holds) for a memory-bound elementwise kernel, so at most 65536 / (32 * 16) = 128 registers
# per thread. fp64 variants exist for gradcheck only and may use up to the 255 a thread can have.
MIN_RESIDENT_WARPS = 16
MAX_REGS = 65536 // (32 * MIN_RESIDENT_WARPS)
MAX_REGS_F64 = 255

# A README size (every length a multiple of 16: block 1024, the most specialised variants) and a tiny
# odd one (block 16, nothing a multiple of 16: the least specialised).
SHAPES = {"cifar10-latent": (64, (8, 16, 16)), "tiny": (3, (5,))}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Variant:
    kernel: str  # the kernel's function name
    key: str  # signature, specialisations, constexprs, warps: one compile
    dtype: str  # the storage dtype of the call that produced it (first seen)
    case: str  # the call that produced it (first seen)
    block: int
    num_warps: int
    args: tuple = field(repr=False, default=())
    kwargs: dict = field(repr=False, default_factory=dict)

    @property
    def elems_per_thread(self) -> int:
        return max(1, self.block // (32 * self.num_warps))


@contextlib.contextmanager
def _captured():
    """Patch the launchers' kernel launches: yields the list [(jit function, args, kwargs)] they append to."""
    from . import correlated_sample as cs
    from . import gaussian_head as gh

    calls = []

    class _Capture:
        def __init__(self, kernel):
            self.kernel = kernel if hasattr(kernel, "signature") else kernel.kernel  # a JITFunction

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.kernel, a, kw))

    saved = (cs.wrap_triton, gh.wrap_triton, cs._ou_noise_kernel)
    cs.wrap_triton = gh.wrap_triton = _Capture
    cs._ou_noise_kernel = _Capture(saved[2])
    try:
        yield calls
    finally:
        cs.wrap_triton, gh.wrap_triton, cs._ou_noise_kernel = saved


def _cases():
    """(label, dtype, thunk) for every launcher call of the grid; each thunk calls one launcher body.

    The grid: every dtype at K = 5 with a 64-bit seed and offset (the model's) on the model's
    channel halves; float32 also at K = 1 (K is a specialised constant in the loops over k), with
    32-bit seeds and offsets, and on packed head inputs: 70 compiles per target."""
    from . import correlated_sample as cs
    from . import gaussian_head as gh

    for sname, (B, S) in SHAPES.items():
        for dt in DTYPES:
            dn = str(dt).removeprefix("torch.")
            f32 = dt == torch.float32
            z = torch.ones((B, *S), dtype=dt)
            for K, seed, off in [(5, 2**40 + 7, 2**33)] + ([(1, 2**40 + 7, 2**33), (5, 12345, 0)] if f32 else []):
                lab = f"{sname} {dn} K={K} seed={'i64' if seed > 2**31 else 'i32'}"
                yield lab, dt, lambda z=z, K=K, s=seed, o=off: cs.correlated_samples_fwd._init_fn(z, z, z, 0.9, K, s, o)
                g = torch.ones((K, B, *S), dtype=dt)
                yield lab, dt, lambda g=g, K=K, s=seed, o=off: cs.correlated_samples_bwd._init_fn(g, 0.9, K, s, o)
                if f32:
                    yield lab, dt, lambda K=K, s=seed, o=off, S=S, B=B: cs.correlated_noise(s, K, (B, *S),
                                                                                           offset_base=o)
            t = torch.ones((B, *S), dtype=dt)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            mbar, sbar = torch.ones((B, *S), dtype=acc), torch.ones((B, *S), dtype=acc)
            grad = torch.ones(B, dtype=acc)
            for K, layout in [(5, "halves")] + ([(1, "halves"), (5, "packed")] if f32 else []):
                m, s = (torch.ones((K, B, 2 * S[0], *S[1:]), dtype=dt).chunk(2, dim=2) if layout == "halves"
                        else (torch.ones((K, B, *S), dtype=dt),) * 2)
                for ratio in (False, True):
                    lab = f"{sname} {dn} K={K} {'ratio' if ratio else 'mean-std'} {layout}"
                    yield lab, dt, lambda m=m, s=s, r=ratio, t=t: gh.gaussian_head_fwd._init_fn(m, s, t, r, 1e-3)
                    yield lab, dt, lambda m=m, s=s, r=ratio, t=t, mb=mbar, sb=sbar, g=grad, d=dt: \
                        gh.gaussian_head_bwd._init_fn(g, m if r else s, s, t, mb, sb, r, 1e-3, d)


def _binder(kernel, backend):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _make_backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _pack(kernel, backend, args, kwargs):
    bound, spec, options = _binder(kernel, backend)(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, spec, options)


def variants() -> list[Variant]:
    """One Variant per distinct compile of every kernel over CASES (compile keys as on sm_90)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        from hvae_fast.errors import HVAEError

        raise HVAEError("the ahead-of-time compile needs compiled Triton: unset TRITON_INTERPRET "
                        "(run python -m hvae_fast.kernels.aot)")
    _, backend = _make_backend(90)
    out: dict = {}
    with _captured() as calls:
        for label, dt, thunk in _cases():
            calls.clear()
            thunk()
            for kernel, args, kwargs in calls:
                options, signature, constexprs, attrs = _pack(kernel, backend, args, kwargs)
                key = repr((kernel.fn.__name__, signature, sorted(constexprs.items(), key=repr),
                            sorted(attrs.items(), key=repr), options.num_warps))
                if key not in out:
                    out[key] = Variant(kernel.fn.__name__, key, str(dt).removeprefix("torch."), label,
                                       int(kwargs["BLOCK"]), int(options.num_warps), args, kwargs)
    return list(out.values())


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


_LOOP_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_MEM = re.compile(r"\b(LDG|STG)\.E(?:\.(?:EL|LU|EF|CONSTANT|STRONG\.\w+|SYS|GPU))*(?:\.(U8|S8|U16|S16|64|128))?\b")
_WIDTH = {None: 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def sass_figures(sass: str) -> dict:
    """Static counts of one kernel's SASS: instructions (NOPs excluded), the loop body (the largest
    backward branch's range, where there is one), and the LDG / STG bytes a thread issues outside
    the loop and per loop iteration. Loads from the Payne-Hanek table of cos / sin's slow path
    (``LDG.E.CONSTANT`` in a small loop) are not traffic of the op's tensors and are left out."""
    instrs = []
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m and not m.group(2).strip().startswith("NOP"):
            instrs.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in instrs:
        b = _LOOP_BRANCH.search(f"/*{addr:04x}*/ {text}")
        if b and int(b.group(2), 16) < addr:
            loops.append((int(b.group(2), 16), addr))
    # the loop over k: the widest backward branch that holds a global store or load of the op
    body = None
    for lo, hi in sorted(loops, key=lambda r: r[0] - r[1]):
        inside = [t for a, t in instrs if lo <= a <= hi]
        if any(_MEM.search(t) and "CONSTANT" not in t for t in inside):
            body = (lo, hi)
            break

    def traffic(sel):
        ld = st = 0
        for a, t in instrs:
            m = _MEM.search(t)
            if m and "CONSTANT" not in t and sel(a):
                w = _WIDTH[m.group(2)]
                if m.group(1) == "LDG":
                    ld += w
                else:
                    st += w
        return ld, st

    in_body = (lambda a: body[0] <= a <= body[1]) if body else (lambda a: False)
    ld0, st0 = traffic(lambda a: not in_body(a))
    ld1, st1 = traffic(in_body)
    return {"instructions": len(instrs),
            "loop_instructions": sum(1 for a, _ in instrs if in_body(a)),
            "load_bytes": ld0, "store_bytes": st0, "loop_load_bytes": ld1, "loop_store_bytes": st1}


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for sm_<arch>: {regs, stack, local, shared, instructions, ...} per thread / program."""
    import triton
    from triton.compiler import ASTSource

    from . import correlated_sample as cs
    from . import gaussian_head as gh

    kernel = getattr(cs, v.kernel, None) or getattr(gh, v.kernel)
    target, backend = _make_backend(arch)
    options, signature, constexprs, attrs = _pack(kernel, backend, v.args, v.kwargs)
    # Triton's ptxas runs with -v; TRITON_DUMP_PTXAS_LOG=1 prints its log (not on a cache hit)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        finally:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
    log = buf.getvalue()
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        if "spill stores" not in log:  # a cache hit: ptxas -v again, with the flags Triton compiles with
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(ck.asm["ptx"])
            flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"] + ([] if options.enable_fp_fusion else ["--fmad=false"])
            log = subprocess.run([get_ptxas(arch).path, *flags, f"--gpu-name={sm_arch_from_capability(arch)}", ptx,
                                  "-o", os.path.join(d, "v.cubin")], capture_output=True, text=True, check=True).stderr
    stack, spill_st, spill_ld = (int(x) for x in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    out = {"kernel": v.kernel, "arch": f"sm_{arch}", "dtype": v.dtype, "case": v.case, "block": v.block,
           "num_warps": v.num_warps, "elems_per_thread": v.elems_per_thread,
           "regs": int(re.search(r"Used (\d+) registers", log).group(1)), "stack": stack,
           "spill_stores": spill_st, "spill_loads": spill_ld, "shared": int(getattr(ck.metadata, "shared", 0) or 0)}
    out.update(sass_figures(sass))
    return out


def _compile_one(job):
    v, arch = job
    return compile_variant(v, arch)


def _is_figure_variant(v: Variant) -> bool:
    return v.block == 1024 and v.dtype == "float32" and "K=5" in v.case and "packed" not in v.case \
        and "seed=i32" not in v.case


def compile_all(archs=ARCHS, workers: int | None = None, only_figures: bool = False) -> list[dict]:
    """compile_variant for every variant (or only those of ``figures``) and arch, in ``workers``
    processes (default: the CPU count)."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    jobs = [(v, a) for v in variants() if not only_figures or _is_figure_variant(v) for a in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


# Static performance figures (``figures``): the op sizes of the README / bench/bench_ou_ops.py, and
# per GPU its memory bandwidth (bytes/s) and thread-instruction issue rate (SMs x 4 schedulers x 32
# lanes x boost clock, one warp instruction per scheduler per clock).
FIGURE_SIZES = {"mnist-mlp": (100, 5, (40,)), "cifar10-latent": (64, 5, (8, 16, 16)),
                "cifar10-feat100": (64, 5, (100, 16, 16))}
GPUS = {"A100": (80, 2.039e12, 108 * 128 * 1.41e9), "H100": (90, 3.35e12, 132 * 128 * 1.98e9)}


def per_element(r: dict, K: int) -> tuple[float, float]:
    """(SASS instructions, global bytes) per element of a compiled variant's grid, for K samples: the
    code outside the loop over k once, its body K times (kernels without the loop run once per (k, j))."""
    ept = r["elems_per_thread"]
    outside = r["instructions"] - r["loop_instructions"]
    instr = (outside + K * r["loop_instructions"]) / ept
    nbytes = (r["load_bytes"] + r["store_bytes"] + K * (r["loop_load_bytes"] + r["loop_store_bytes"])) / ept
    return instr, nbytes


def grid_elements(kernel: str, B: int, K: int, S: tuple) -> int:
    """Elements of a kernel's grid: K N for the forward and noise kernels (one program per block of a
    row), N for the kernels that loop over k."""
    n = B * int(torch.tensor(S).prod())
    return K * n if kernel in ("_ou_fwd_kernel", "_ou_noise_kernel") else n


def figures(rows: list) -> list[dict]:
    """Per kernel and target, for the training variant (float32, block 1024, K = 5, 64-bit seed, the
    model's channel halves; mean-std and ratio for the head): registers, spills, shared memory,
    instructions and bytes per element, and the ideal time (max of bytes / bandwidth and instructions
    / issue rate) at each README size on an A100 and an H100."""
    out = []
    for r in rows:
        if not _is_figure_variant(Variant(r["kernel"], "", r["dtype"], r["case"], r["block"], r["num_warps"])):
            continue
        gpu = next(name for name, (arch, _, _) in GPUS.items() if f"sm_{arch}" == r["arch"])
        _, bw, rate = GPUS[gpu]
        mode = "ratio" if "ratio" in r["case"] else "mean-std" if r["kernel"].startswith("_gh") else ""
        f = {k: r[k] for k in ("kernel", "arch", "regs", "spill_stores", "shared")}
        f.update(gpu=gpu, mode=mode)
        f["instr_per_elem"], f["bytes_per_elem"] = (round(x, 1) for x in per_element(r, 5))
        for size, (B, K, S) in FIGURE_SIZES.items():
            n = grid_elements(r["kernel"], B, K, S)
            instr, nbytes = per_element(r, K)
            f[f"ideal_us_{size}"] = round(1e6 * max(n * nbytes / bw, n * instr / rate), 2)
            f[f"bound_{size}"] = "instr" if n * instr / rate > n * nbytes / bw else "memory"
        out.append(f)
    return out


def figures_table(figs: list) -> str:
    sizes = list(FIGURE_SIZES)
    head = ["kernel", "mode", "GPU", "regs", "spills B", "shared B", "SASS/elem", "B/elem"] + \
        [f"ideal us {s}" for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figs:
        cells = [f["kernel"], f["mode"], f"{f['gpu']} ({f['arch']})", f["regs"], f["spill_stores"], f["shared"],
                 f["instr_per_elem"], f["bytes_per_elem"]] + \
            [f"{f['ideal_us_' + s]}{' (instr)' if f['bound_' + s] == 'instr' else ''}" for s in sizes]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvae_fast.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON list of the compiled variants")
    p.add_argument("--arch", type=int, action="append", help="sm version (default: 80 and 90)")
    p.add_argument("--figures", action="store_true", help="only the training variants: the static figures table")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all(tuple(args.arch or ARCHS), only_figures=args.figures)
    if args.figures:
        figs = figures(rows)
        print(json.dumps(figs) if args.json else figures_table(figs))
        return 0
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['kernel']:<16} {r['arch']} {r['dtype']:<9} block {r['block']:>4}/{r['num_warps']}w "
                  f"regs {r['regs']:>3} spill {r['spill_stores']}/{r['spill_loads']} stack {r['stack']} "
                  f"shared {r['shared']} "
                  f"sass {r['instructions']} (loop {r['loop_instructions']})  {r['case']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
