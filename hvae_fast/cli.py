"""The `hvae-fast` command line: train, eval, sample, presets, info, build, memory, plot.

Every user error is an HVAEError, printed as one line with a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

from .errors import HVAEError

log = logging.getLogger("hvae_fast")


def _steps_pair(s: str):
    try:
        a, b = (int(float(v)) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ZERO_STEPS,RAMP_STEPS (two integers), got {s!r}")
    return (a, b)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import METHODS
    from .data import DATASETS
    from .ou import BACKEND_NAMES, OU_TARGETS

    p.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--preset", help="experiment preset (`hvae-fast presets`); default: the dataset's paper configuration")
    p.add_argument("--method", choices=METHODS, help="objective / model family (default hvae)")
    p.add_argument("--rho", type=float, help="OU correlation in [0, 1]; 1 = no smoothing (plain VAE gradients)")
    p.add_argument("--ou-samples", type=int, dest="K", help="K, correlated samples per posterior sample (>= 1)")
    p.add_argument("--ou-target", choices=OU_TARGETS, help="average the Gaussian head's mean and std, or mu/sigma")
    p.add_argument("--ou-inference", action="store_true", default=None, help="also smooth the inference network")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="OU kernels: auto picks the fastest available and logs it")
    p.add_argument("--ou-recompute", action="store_true", default=None,
                   help="recompute the K-sample generator activations in backward (less memory, more time)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("adam", "adamax"))
    p.add_argument("--lr-schedule", choices=("constant", "cosine", "exponential"))
    p.add_argument("--grad-clip", type=float, help="max global gradient norm; 0 disables")
    p.add_argument("--kl-anneal", type=_steps_pair, metavar="ZERO_STEPS,RAMP_STEPS",
                   help="KL weight 0 for ZERO_STEPS, then linear to 1 over RAMP_STEPS (reported ELBOs use weight 1)")
    p.add_argument("--free-bits", type=float, metavar="NATS",
                   help="per-layer floor: each stochastic layer's KL, averaged over the minibatch, is clamped from below")
    p.add_argument("--iw-samples-train", type=int, metavar="k", help="IWAE's k (method iwae)")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-examples", type=int, help="validation examples per periodic evaluation (0 = all)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<method>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint-latest.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# (argparse dest, config section, field)
_OVERRIDES = [("method", None, "method"), ("rho", "ou", "rho"), ("K", "ou", "samples"), ("ou_target", "ou", "target"),
              ("ou_inference", "ou", "smooth_inference"), ("ou_recompute", "ou", "recompute"), ("backend", "ou", "backend"),
              ("steps", "train", "steps"), ("batch_size", "train", "batch_size"), ("lr", "train", "lr"),
              ("optimizer", "train", "optimizer"), ("lr_schedule", "train", "lr_schedule"),
              ("grad_clip", "train", "grad_clip"), ("kl_anneal", "train", "kl_anneal"),
              ("free_bits", "train", "free_bits"), ("iw_samples_train", "train", "iw_samples_train"),
              ("seed", "train", "seed"), ("log_every", "train", "log_every"), ("eval_every", "train", "eval_every"),
              ("eval_examples", "train", "eval_examples"), ("checkpoint_every", "train", "checkpoint_every"),
              ("sample_every", "train", "sample_every"), ("device", None, "device")]


def config_from_args(args):
    """The RunConfig of a `train` command: preset (or the saved config on --resume) + flags."""
    from .config import DEFAULT_PRESET, PRESETS, RunConfig, preset_config
    from .data import DATASETS

    if args.dataset not in DATASETS:
        raise HVAEError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    saved = args.out / "config.json" if args.resume and args.out is not None else None
    if saved is not None and saved.exists() and args.preset is None:
        cfg = RunConfig.from_dict(json.loads(saved.read_text()))
        if cfg.dataset != args.dataset:
            raise HVAEError(f"--resume: {args.out} is a {cfg.dataset} run, not {args.dataset}: "
                            f"pass `hvae-fast train {cfg.dataset} --out {args.out} --resume`")
    else:
        name = args.preset or DEFAULT_PRESET[args.dataset]
        cfg = preset_config(name, args.dataset)
        if name in PRESETS and PRESETS[name].dataset.replace("binarized-", "") != args.dataset.replace("binarized-", ""):
            raise HVAEError(f"preset {name!r} is made for {PRESETS[name].dataset}, not {args.dataset}: "
                            f"pick one from `hvae-fast presets`")
    for dest, section, fld in _OVERRIDES:
        v = getattr(args, dest, None)
        if v is not None:
            setattr(getattr(cfg, section) if section else cfg, fld, v)
    return cfg.validate()


def cmd_train(args) -> int:
    from .trainer import Trainer

    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"{cfg.preset}-{cfg.method}-seed{cfg.train.seed}"
    trainer = Trainer(cfg, out, data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress)
    rec = trainer.fit()
    print(f"done: {trainer.step} steps in {out}; last train ELBO {rec.get('elbo', float('nan')):.3f} nats, "
          f"best validation ELBO {trainer.best_valid:.3f}; skipped non-finite steps: {trainer.skipped}")
    return 0


def load_run(run_dir: Path, device: str = "auto", which: str = "best"):
    """(config, model) of a run directory, from checkpoint-best.pt (or -latest)."""
    import torch

    from .config import RunConfig
    from .data import image_shape
    from .model import build_model
    from .trainer import resolve_device

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise HVAEError(f"{run_dir} is not a run directory (no config.json): pass the --out of a `hvae-fast train` run")
    cfg = RunConfig.from_dict(json.loads(cfg_path.read_text()))
    ckpt = run_dir / f"checkpoint-{which}.pt"
    if not ckpt.exists():
        ckpt = run_dir / "checkpoint-latest.pt"
    if not ckpt.exists():
        raise HVAEError(f"no checkpoint in {run_dir}: train first, or wait for the first checkpoint")
    dev = resolve_device(device)
    model = build_model(cfg.method, cfg.model, image_shape(cfg.dataset)).to(dev)
    try:
        st = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
    except Exception as exc:
        raise HVAEError(f"cannot load {ckpt}: {exc}") from exc
    model.eval()
    return cfg, model, dev, st.get("step", 0)


def cmd_eval(args) -> int:
    from .data import eval_batches, load_dataset
    from .evaluate import evaluate, format_table

    cfg, model, dev, step = load_run(args.run_dir, args.device)
    ds = load_dataset(cfg.dataset, args.split, args.data_dir)
    res = evaluate(model, lambda: eval_batches(ds, args.batch_size, args.seed, args.max_examples), dev, iw_samples=args.iw_samples, iw_chunk=args.iw_chunk,
                   seed=args.seed, progress=not args.no_progress)
    res.update(split=args.split, step=step, dataset=cfg.dataset, method=cfg.method, preset=cfg.preset)
    out = Path(args.run_dir) / f"eval-{args.split}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(format_table(res))
    print(f"wrote {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .trainer import save_image_grid

    _, model, dev, step = load_run(args.run_dir, args.device)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    imgs = model.sample(args.n, generator=gen, mean=not args.draw)
    out = args.output or Path(args.run_dir) / f"samples-eval-{step:07d}.png"
    save_image_grid(imgs, Path(out))
    print(f"wrote {out}")
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS, DEFAULT_PRESET
    from .data import image_shape
    from .model import build_model, count_parameters

    rows = []
    for name, p in PRESETS.items():
        n = count_parameters(build_model(p.method or "hvae", p.model, image_shape(p.dataset)))
        paper = f"{p.paper_params / 1e6:.2f}M" if p.paper_params else "-"
        default = " (default)" if DEFAULT_PRESET.get(p.dataset) == name else ""
        rows.append((name, p.dataset + default, f"{n / 1e6:.2f}M", paper, p.description))
    w = [max(len(r[i]) for r in rows + [("preset", "dataset", "params", "paper", "")]) for i in range(4)]
    print(f"{'preset':<{w[0]}}  {'dataset':<{w[1]}}  {'params':>{w[2]}}  {'paper':>{w[3]}}  description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}")
    return 0


def info_dict() -> dict:
    import numpy
    import torch

    from .ou import backend_status

    d = {"hvae_fast": __import__("hvae_fast").__version__, "python": platform.python_version(),
         "torch": torch.__version__, "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
         "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception as exc:
        d["triton"] = f"not importable: {exc}"
    d["backends"] = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        d["backends"][dev] = {k: {"available": ok, "reason": why} for k, (ok, why) in backend_status(dev).items()}
        from .ou import get_backend

        d["backends"][dev]["auto"] = get_backend("auto", dev).name
    return d


def cmd_info(args) -> int:
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
    return 0


def cmd_build(args) -> int:
    from . import native

    status = native.build_all(verbose=args.verbose)
    for name, (ok, why) in status.items():
        print(f"{name:<5} {'built' if ok else 'not built':<10} {why}")
    # The CPU extension must build everywhere; CUDA only where torch has a GPU.
    return 0 if status["cpp"][0] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvae-fast", description="Hermite VAEs: train, evaluate, sample, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (`hvae-fast train cifar10` = the paper's CIFAR-10 HVAE)")
    _add_train_args(t)
    t.add_argument("--data-dir", help="dataset folder (default: $HVAE_DATA_DIR, else a per-user cache)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run: ELBO, IW bound, per-layer KL, active units")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--split", choices=("valid", "test"), default="valid")
    e.add_argument("--iw-samples", type=int, default=100, help="L of the importance-weighted bound (0 = skip)")
    e.add_argument("--iw-chunk", type=int, default=500, help="samples per example evaluated at once")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--max-examples", type=int, default=0,
                   help="evaluate only the first N examples in file order (0 = all; the MNIST test set's first half is easier)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="write an image grid from a run's generative model")
    s.add_argument("run_dir", type=Path)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draw", action="store_true", help="sample pixels instead of showing the likelihood's mean")
    s.add_argument("--output", type=Path)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    sub.add_parser("presets", help="list the presets with parameter counts").set_defaults(func=cmd_presets)

    i = sub.add_parser("info", help="versions, device and the OU backends available")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("build", help="compile the C++/CUDA OU kernels now (otherwise on first use)")
    b.set_defaults(func=cmd_build)

    from . import diagnostics, memory, plots

    memory.add_parser(sub)
    plots.add_parser(sub)
    diagnostics.add_parser(sub, load_run)  # TODO(merge): diagnostics imports load_run from .trainer
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
