"""The `hvae-fast` command line: train, eval, sample, presets, info, build, memory, plot.

Every user error is an HVAEError (or an argparse error), printed as one line
``hvae-fast: error: ...`` with exit status 2; anything else is a bug and keeps its traceback.
The train flags are generated from the config dataclasses' fields (config.py), one flag a field.
Every command joins the parser one way: its module's ``register(subparsers)`` (this module's for
the core commands), listed once in ``command_modules()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from .errors import HVAEError
from .reporting.outputs import PLOT_EXTS, check_writable  # noqa: F401 (PLOT_EXTS: part of the CLI's API)
from .reporting.outputs import output_type as _output
from .training.oom import check_fits, out_of_memory

log = logging.getLogger("hvae_fast")
MAX_INT = 2**63 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line naming the flag, exit status 2."""

    def error(self, message):
        self.exit(2, f"hvae-fast: error: {message}; see `{self.prog} --help`\n")


# -- value parsers: each raises ArgumentTypeError, which argparse prefixes with the flag's name --------

def _int(s: str) -> int:
    """An integer; 1e5-style is accepted when it is a whole number of magnitude below 2**63."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not (math.isfinite(v) and v == int(v) and abs(v) <= MAX_INT):
        raise argparse.ArgumentTypeError(f"expected an integer of magnitude below 2**63, got {s!r}")
    return int(v)


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _ints(s: str) -> tuple:
    """A comma list of integers: "64,32,16"."""
    try:
        return tuple(_int(v) for v in s.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 4,6, got {s!r}") from None


def _count(lo: int, hi: int = MAX_INT):
    """Parser of an integer in [lo, hi]."""
    def parse(s):
        v = _int(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}" + (f" and <= {hi}" if hi < MAX_INT else "")
                                             + f", got {s!r}")
        return v
    return parse


def _device(s: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")
    return s


def _counts(lo: int):
    """Parser of a comma list of integers, each >= lo."""
    def parse(s):
        v = _ints(s)
        if min(v) < lo:
            raise argparse.ArgumentTypeError(f"each entry must be >= {lo}, got {s!r}")
        return v
    return parse


_SIZE_FIELDS = {"mlp": ("latent_sizes", "hidden_sizes")}  # other archs: _RESNET_SIZE_FIELDS
_RESNET_SIZE_FIELDS = ("num_layers", "channels", "blocks", "data_blocks", "latent_channels")
_LADDER_SIZE_FIELDS = ("latents_per_scale", "channels", "blocks", "latent_channels")


def _check_model_fits(cfg) -> str:
    """Refuse, before anything is allocated, a model whose weights, gradients and two Adam moments
    (16 bytes a parameter) exceed its device's total memory; returns the size flags as typed."""
    import torch

    from .config import as_flag_value, flag_of
    from .data import image_shape
    from .models.model import build_model

    names = _LADDER_SIZE_FIELDS if cfg.method == "ladder" else _SIZE_FIELDS.get(cfg.model.arch, _RESNET_SIZE_FIELDS)
    fields = {f.name: f for f in dataclasses.fields(cfg.model)}
    sizes = " ".join(f"{flag_of(fields[n])} {as_flag_value(getattr(cfg.model, n))}" for n in names if n in fields)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(cfg.method, cfg.model, image_shape(cfg.dataset))
        need = 16 * sum(p.numel() for p in model.parameters())
    except (RuntimeError, OverflowError, ValueError, MemoryError):  # a size past what a tensor can hold
        need = None
    check_fits(need, cfg.device, f"the model of {sizes} (its weights, gradients and optimizer state)", "lower them")
    return sizes


# -- train: flags generated from the config fields --------------------------------------------------

def _dest(section, f) -> str:
    return f"cfg.{section or 'run'}.{f.name}"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import as_flag_value, config_fields, field_choices, field_kind, flag_of
    from .data import DATASETS

    p.add_argument("dataset", nargs="?", help=f"one of {', '.join(DATASETS)} (optional with --config)")
    p.add_argument("--preset", help="experiment preset (`hvae-fast presets`); default: the dataset's paper configuration")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="start from a saved config.json (a run's, or --print-config's) instead of a preset; flags apply on top")
    p.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit without training")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<method>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint-latest.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data-dir", help="dataset folder (default: $HVAE_DATA_DIR, else a per-user cache)")
    g = p.add_argument_group(
        "config fields", "Each flag sets one field of the run's config. The default shown is the field's own; the "
        "preset (each dataset has a default one) or --config sets many fields differently: --print-config shows "
        "the values a run would use.")
    choices = field_choices()
    for section, f in config_fields():
        m = f.metadata
        if m.get("flag") is False:
            continue
        parts = [m.get("help", "") + (f" ({' | '.join(choices[f.name])})" if f.name in choices else ""),
                 "only with --method " + "/".join(m["methods"]) if "methods" in m else "",
                 f"default {as_flag_value(f.default)}"]
        kw = dict(dest=_dest(section, f), default=None, help="; ".join(x for x in parts if x).replace("%", "%%"))
        if field_kind(f) == "bool":
            g.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **kw)
        else:
            parse = {"int": _int, "float": _float, "str": str, "tuple": _ints}[field_kind(f)]
            g.add_argument(flag_of(f), type=parse, metavar=m.get("metavar") or f.name.upper(), **kw)


def config_from_args(args):
    """The RunConfig of a `train` command: preset, --config or the saved config on --resume; flags on top."""
    from .config import DEFAULT_PRESET, LADDER_PRESET, PRESETS, config_fields, flag_of, load_config, preset_config
    from .data import DATASETS

    if args.dataset is not None and args.dataset not in DATASETS:
        raise HVAEError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.config is not None and args.preset is not None:
        raise HVAEError("--config and --preset both pick the starting config: pass one of them")
    given = [(s, f, getattr(args, _dest(s, f))) for s, f in config_fields()
             if f.metadata.get("flag") is not False and getattr(args, _dest(s, f)) is not None]
    method_flag = next((v for s, f, v in given if s is None and f.name == "method"), None)
    saved = args.out / "config.json" if args.resume and args.out is not None else None
    if args.config is not None:
        cfg = load_config(args.config)
        if args.dataset is not None and cfg.dataset != args.dataset:
            raise HVAEError(f"--config {args.config} is a {cfg.dataset} config, not {args.dataset}: "
                            f"drop DATASET or pass {cfg.dataset}")
    elif saved is not None and saved.exists() and args.preset is None:
        cfg = load_config(saved)
        if args.dataset is not None and cfg.dataset != args.dataset:
            raise HVAEError(f"--resume: {args.out} is a {cfg.dataset} run, not {args.dataset}: "
                            f"pass `hvae-fast train {cfg.dataset} --out {args.out} --resume`")
    else:
        if args.dataset is None:
            raise HVAEError(f"train needs a DATASET ({', '.join(DATASETS)}) or --config FILE")
        name = args.preset or (method_flag == "ladder" and LADDER_PRESET.get(args.dataset)) or DEFAULT_PRESET[args.dataset]
        cfg = preset_config(name, args.dataset)
        p = PRESETS[name]
        if p.dataset.replace("binarized-", "") != args.dataset.replace("binarized-", ""):
            raise HVAEError(f"preset {name!r} is made for {p.dataset}, not {args.dataset}: "
                            f"pick one from `hvae-fast presets`")
        if p.method is not None and method_flag not in (None, p.method):
            raise HVAEError(f"preset {name!r} is made for --method {p.method}, not {method_flag}: drop --method, "
                            f"or pick a preset for {method_flag} (`hvae-fast presets`)")
    for section, f, v in given:
        setattr(getattr(cfg, section) if section else cfg, f.name, v)
    for _, f, _ in given:
        methods = f.metadata.get("methods")
        if methods and cfg.method not in methods:
            raise HVAEError(f"{flag_of(f)} applies to --method {'/'.join(methods)} only; this run's method is "
                            f"{cfg.method}: drop {flag_of(f)}, or pass --method {'/'.join(methods)}")
    return cfg.validate()


def cmd_train(args) -> int:
    try:
        cfg = config_from_args(args)
    except HVAEError:
        # Under torchrun every process checks the same arguments: rank 0's message speaks for all.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
            return 2
        raise
    if args.print_config:
        print(cfg.to_json())
        return 0
    from .training.rundir import WriteFailed
    from .training.trainer import Trainer, TrainingInterrupted

    out = args.out or Path("runs") / f"{cfg.preset}-{cfg.method}-seed{cfg.train.seed}"
    sizes = _check_model_fits(cfg)
    trainer = None
    try:
        with out_of_memory(f"building the model ({sizes}): lower them"):
            trainer = Trainer(cfg, out, data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress)
        rec = trainer.fit()
    except TrainingInterrupted as exc:
        if trainer.world.main:  # under torchrun, rank 0 speaks for the run
            print(f"hvae-fast: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step, but say how to go on
        if trainer is None or trainer.resume_note() is None:
            raise
        if trainer.world.main:
            print(f"hvae-fast: interrupted; {trainer.resume_note()}", file=sys.stderr)
        return 130
    except WriteFailed as exc:
        raise HVAEError(exc.advise("and run again, with --resume if checkpoint-latest.pt exists",
                                   elsewhere=" (or pass --out on another disk)")) from None
    if trainer.world.main:
        print(f"done: {trainer.step} steps in {out}; last train ELBO {rec.get('elbo', float('nan')):.3f} nats, "
              f"best validation ELBO {trainer.best_valid:.3f}; skipped non-finite steps: {trainer.skipped}")
    return 0


def cmd_eval(args) -> int:
    from .data import eval_batches, load_dataset
    from .training.evaluate import evaluate, format_table
    from .training.rundir import WriteFailed, atomic_write_text, load_run, refuse_link

    cfg, model, dev, step = load_run(args.run_dir, args.device)
    out = Path(args.run_dir) / f"eval-{args.split}.json"
    refuse_link(out)
    check_writable(out)
    ds = load_dataset(cfg.dataset, args.split, args.data_dir)
    n = min(args.max_examples, len(ds)) if args.max_examples > 0 else len(ds)
    batches = math.ceil(n / min(args.batch_size, n))
    log.info("evaluating %s on %d %s examples, %d batches of %d; IW bound with L=%d, %d samples at a time",
             args.run_dir, n, args.split, batches, min(args.batch_size, n), args.iw_samples,
             min(args.iw_chunk, args.iw_samples))
    with out_of_memory(f"with --batch-size {args.batch_size} x --iw-chunk {args.iw_chunk} samples at once: "
                       f"lower --iw-chunk (or --batch-size); --iw-samples only costs time"):
        res = evaluate(model, lambda: eval_batches(ds, args.batch_size, args.seed, args.max_examples), dev,
                       iw_samples=args.iw_samples, iw_chunk=args.iw_chunk, seed=args.seed,
                       progress=not args.no_progress, num_batches=batches)
    res.update(split=args.split, step=step, dataset=cfg.dataset, method=cfg.method, preset=cfg.preset)
    print(format_table(res))
    try:
        atomic_write_text(json.dumps(res, indent=2) + "\n", out)
    except WriteFailed as exc:
        print(json.dumps(res, indent=2))
        raise HVAEError(exc.advise("and run eval again; the evaluation is printed above as JSON")) from None
    print(f"wrote {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .training.rundir import WriteFailed, load_run, refuse_link, save_image_grid

    _, model, dev, step = load_run(args.run_dir, args.device)
    out = args.output or Path(args.run_dir) / f"samples-eval-{step:07d}.png"
    refuse_link(out)
    check_writable(out)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    with out_of_memory(f"drawing -n {args.n} samples at once: lower -n"):
        imgs = model.sample(args.n, generator=gen, mean=not args.draw)
    try:
        save_image_grid(imgs, Path(out))
    except WriteFailed as exc:
        raise HVAEError(exc.advise("and run again, or pass --output to another file")) from None
    print(f"wrote {out}")
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS, DEFAULT_PRESET
    from .data import image_shape
    from .models.model import build_model, count_parameters

    rows = []
    for name, p in PRESETS.items():
        n = count_parameters(build_model(p.method or "hvae", p.model, image_shape(p.dataset)))
        paper = f"{p.paper_params / 1e6:.2f}M" if p.paper_params else "-"
        default = " (default)" if DEFAULT_PRESET.get(p.dataset) == name else ""
        rows.append((name, p.dataset + default, f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}", paper, p.description))
    w = [max(len(r[i]) for r in rows + [("preset", "dataset", "params", "paper", "")]) for i in range(4)]
    print(f"{'preset':<{w[0]}}  {'dataset':<{w[1]}}  {'params':>{w[2]}}  {'paper':>{w[3]}}  description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}")
    return 0


def info_dict() -> dict:
    import numpy
    import torch

    from .ops.ou import backend_status

    d = {"hvae_fast": __import__("hvae_fast").__version__, "python": platform.python_version(),
         "torch": torch.__version__, "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
         "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception as exc:
        d["triton"] = f"not importable: {exc}"
    from .ops.autotune import cached_decisions

    d["backends"], d["auto"] = {}, {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        d["backends"][dev] = {k: {"available": ok, "reason": why} for k, (ok, why) in backend_status(dev).items()}
        path, env, decisions = cached_decisions(dev)
        d["backends"][dev]["auto"] = f"per op and shape class, {len(decisions)} cached decisions"
        d["auto"][dev] = {"cache": str(path), "environment": env, "decisions": decisions}
    return d


def cmd_info(args) -> int:
    if args.kernels:
        # The kernels compile ahead of time for sm_80 / sm_90 with compiled Triton (no GPU needed):
        # a subprocess, since TRITON_INTERPRET decides at import how the kernels are defined.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        p = subprocess.run([sys.executable, "-m", "hvae_fast.kernels.aot", "--figures"] + (["--json"] if args.json else []),
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise HVAEError(f"the ahead-of-time compile of the Triton kernels failed: {last}")
        print(p.stdout, end="")
        return 0
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k in ("hvae_fast", "python", "torch", "triton", "numpy", "cuda_available", "cuda_device"):
        print(f"{k:<15} {d[k]}")
    for dev, st in d["backends"].items():
        print(f"OU backends on {dev} (auto -> {st['auto']}):")
        for name, s in st.items():
            if name != "auto":
                print(f"  {name:<7} {'available' if s['available'] else 'unavailable':<12} {s['reason']}")
        a = d["auto"][dev]
        print(f"  auto decisions in {a['cache']} ({a['environment']}):")
        for key, rec in sorted(a["decisions"].items()):
            ms = ", ".join(f"{n} {t:.3g} ms" for n, t in rec.get("ms", {}).items()) or "the only candidate"
            print(f"    {key} -> {rec['choice']} ({ms})")
    return 0


def cmd_build(args) -> int:
    from .ops import native

    status = native.build_all(verbose=args.verbose)
    for name, (ok, why) in status.items():
        print(f"{name:<5} {'built' if ok else 'not built':<10} {why}")
    # The CPU extension must build everywhere; CUDA only where torch has a GPU, or HVAE_REQUIRE_CUDA=1.
    from .ops.backends import required

    if required("cuda") and not status["cuda"][0]:
        print(f"hvae-fast: error: HVAE_REQUIRE_CUDA=1 and the CUDA extension is not built: {status['cuda'][1]}",
              file=sys.stderr)
        return 1
    return 0 if status["cpp"][0] else 1


def cmd_memory(args) -> int:
    import torch

    from .experiments import memory
    from .ops.ou import check_ou_args
    from .reporting import memory_table
    from .training.rundir import resolve_device

    check_ou_args(args.rho, args.samples)
    device = resolve_device(args.device)
    with out_of_memory(f"measuring a training step at --batch-size {args.batch_size}: lower --batch-size "
                       f"(or --channels, --blocks)"):
        rows = memory.run_table(args.models, args.depths, args.baseline_depths, batch_size=args.batch_size,
                                samples=args.samples, device=device, backend=args.backend, channels=args.channels,
                                blocks=args.blocks, data_blocks=args.data_blocks, rho=args.rho, seed=args.seed,
                                recompute=args.recompute)
    kind = rows[0]["memory_kind"] if rows else ""
    print(f"memory of one training step on {device} ({kind}), batch {args.batch_size}, "
          f"{args.samples} OU / IWAE samples, synthetic CIFAR-10-shaped inputs (3x32x32, logistic likelihood)")
    if device.type == "cpu":
        print(f"CPU measure: {memory_table.CPU_MEASURE}; peak RSS is the process's, monotone (not per model)")
    print(memory_table.format_table(rows))
    print("paper: CUDA peak memory (Table 6); compare ratios, not absolute numbers, across measures")
    meta = {"device": str(device), "memory_kind": kind, "batch_size": args.batch_size, "samples": args.samples,
            "inputs": "synthetic uniform 8-bit images, 3x32x32", "torch": torch.__version__}
    writers = [(args.json, lambda f: memory_table.write_json(rows, meta, f)),
               (args.csv, lambda f: memory_table.write_csv(rows, f)),
               (args.plot, lambda f: memory_table.write_plot(rows, f))]
    for path, write in writers:
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                raise HVAEError(f"could not write {path}: {exc.strerror or exc}; the table is printed above") from None
            print(f"wrote {path}")
    return 0


def cmd_plot(args) -> int:
    from .reporting.curves import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.output, args.labels)}")
    return 0


def _models(s: str):
    from .experiments.memory import MODELS

    ms = tuple(v for v in s.split(",") if v)
    bad = [m for m in ms if m not in MODELS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"unknown models {bad}: choose from {','.join(MODELS)}")
    return ms


def register(sub) -> None:
    """Register the core commands: train, eval, sample, presets, info, build, memory, plot."""
    from .experiments.memory import MODELS
    from .ops.ou import BACKEND_NAMES
    from .reporting.memory_table import CPU_MEASURE

    seed = dict(type=_count(0), default=0, help="random seed")

    t = sub.add_parser("train", help="train a model (`hvae-fast train cifar10` = the paper's CIFAR-10 HVAE)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run: ELBO, IW bound, per-layer KL, active units")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--split", choices=("valid", "test"), default="valid")
    e.add_argument("--iw-samples", type=_count(0), default=100, metavar="L",
                   help="L of the importance-weighted bound (0 = skip; default 100)")
    e.add_argument("--iw-chunk", type=_count(1), default=500,
                   help="samples per example evaluated at once; memory grows with it (default 500)")
    e.add_argument("--batch-size", type=_count(1), default=100, help="examples per batch (default 100)")
    e.add_argument("--max-examples", type=_count(0), default=0,
                   help="evaluate only the first N examples in file order (0 = all; the MNIST test set's first half is easier)")
    e.add_argument("--seed", **seed)
    e.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--data-dir", help="dataset folder (default: $HVAE_DATA_DIR, else a per-user cache)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="write an image grid from a run's generative model")
    s.add_argument("run_dir", type=Path)
    s.add_argument("-n", type=_count(1), default=64, help="images (default 64)")
    s.add_argument("--seed", **seed)
    s.add_argument("--draw", action="store_true", help="sample pixels instead of showing the likelihood's mean")
    s.add_argument("--output", type=_output(".png"), help="PNG file (default RUN_DIR/samples-eval-<step>.png)")
    s.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    s.set_defaults(func=cmd_sample)

    sub.add_parser("presets", help="list the presets with parameter counts").set_defaults(func=cmd_presets)

    i = sub.add_parser("info", help="versions, device and the OU backends available")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kernels", action="store_true",
                   help="static figures of the Triton kernels compiled for A100 / H100 (no GPU needed; ~1 min)")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("build", help="compile the C++/CUDA OU kernels now (otherwise on first use)")
    b.set_defaults(func=cmd_build)

    m = sub.add_parser(
        "memory", help="peak memory of one training step per model (the paper's Table 6)",
        description=("Reproduce Table 6: memory of one training step (forward, backward, optimizer step, after a "
                     "warm-up step) on synthetic CIFAR-10-shaped inputs. On CUDA: torch.cuda.max_memory_allocated. "
                     f"On CPU: {CPU_MEASURE}, counted with saved_tensors_hooks (allocator-independent), "
                     "next to the process peak RSS (monotone over the process)."))
    m.add_argument("--models", type=_models, default=("vae", "iwae", "hvae", "lvae", "biva"),
                   help="comma-separated subset of vae,iwae,hvae,lvae,biva (the paper's Table 6, the default), "
                        "lvae-ou,biva-ou (the ladders OU-smoothed at --rho), ladder,ladder-ou (the VDVAE-style ladder, "
                        "cifar10-vdvae-ladder-6, unsmoothed / smoothed)")
    m.add_argument("--depths", type=_counts(1), default=(4, 6), help="stochastic layers of vae/iwae/hvae (default 4,6)")
    m.add_argument("--baseline-depths", type=_counts(1), default=(15,), help="stochastic layers of lvae/biva and their -ou rows (default 15)")
    m.add_argument("--batch-size", type=_count(1), default=64, help="default 64")
    m.add_argument("--samples", type=_count(1), default=5, help="OU samples K (hvae) and IWAE samples k (iwae); default 5")
    m.add_argument("--rho", type=_float, default=0.9, help="OU correlation of hvae and the -ou rows (default 0.9)")
    m.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    m.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="OU backend of hvae (compare eager torch vs fused)")
    m.add_argument("--recompute", action="store_true", help="hvae: recompute the K-sample generator activations in backward")
    m.add_argument("--channels", type=_count(1), help="feature maps of every net (shrink for quick runs)")
    m.add_argument("--blocks", type=_count(0), help="ResNet blocks per net, also the nets next to x unless --data-blocks")
    m.add_argument("--data-blocks", type=_count(0), help="ResNet blocks of the nets next to x")
    m.add_argument("--seed", **seed)
    m.add_argument("--json", type=_output(), metavar="FILE", help="write the rows as JSON")
    m.add_argument("--csv", type=_output(), metavar="FILE", help="write the rows as CSV")
    m.add_argument("--plot", type=_output(*PLOT_EXTS), metavar="FILE.png", help="bar chart of memory and ratio to VAE")
    m.set_defaults(func=cmd_memory)

    pl = sub.add_parser("plot", help="training curves of runs side by side: ELBO (train, EMA-smoothed, and "
                        "validation), top-layer KL, active units")
    pl.add_argument("run_dirs", nargs="+", type=Path)
    pl.add_argument("--output", type=_output(*PLOT_EXTS), default="curves.png",
                    help=f"image file, {' / '.join(PLOT_EXTS)} (default curves.png)")
    pl.add_argument("--labels", nargs="+", metavar="LABEL",
                    help="one name per run, in order (default: method, rho and K, plus the folder where two runs share them)")
    pl.set_defaults(func=cmd_plot)


def command_modules() -> tuple:
    """The modules whose ``register(subparsers)`` adds the commands, in `hvae-fast --help` order: the
    one way a command joins the CLI."""
    from . import gpucheck
    from .experiments import diagnostics, report, sweep

    return (sys.modules[__name__], sweep, report, diagnostics, gpucheck)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hvae-fast", description="Hermite VAEs: train, evaluate, sample, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"hvae-fast {__import__('hvae_fast').__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    try:
        return args.func(args)
    except HVAEError as exc:
        print(f"hvae-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hvae-fast: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
