"""Diagnostics of the Hermite VAE at a checkpoint: `hvae-fast gradvar` and `hvae-fast spectrum`.

gradvar: the variance of the OU-smoothed ELBO's gradient over noise draws (posterior and OU
noise), and its bias, the distance of its mean from the plain VAE gradient's mean, for a grid of
(rho, K). Both per generator layer p(z_i | z_{i+1}) (its parameters) and summed over them.

spectrum: the Hermite spectrum of each generator layer's mean by noise stability. With
f(e) = mu_i(m + s e), (m, s) the posterior that drew z_{i+1} (the stacked VAE's q(z_{i+1} | z_i), a
ladder's top-down posterior, whose other inputs stay at the sample's), e ~ N(0, I):
    S(rho) = E[f(e) . f(rho e + sqrt(1 - rho^2) w)] = sum_d rho^d W_d,
W_d the energy of f at Hermite degree d. S is estimated on a grid of rho in [-1, 1] from draws
on circles (noise_stability), W_1..W_D recovered by non-negative least squares with standard
errors, W_0 estimated beside them.

Both read a run directory (config + checkpoint-best/-latest); ``--checkpoints`` names other
checkpoint files or folders of them, and ``--every N`` keeps those whose step is a multiple of N,
so the numbers can be followed over training (the trainer itself keeps only -latest and -best).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import HVAEError
from ..reporting.outputs import PLOT_EXTS, output_type
from ..models.objectives import training_loss
from ..training.oom import check_fits, out_of_memory
from ..training.rundir import load_checkpoint, load_run

# ----------------------------------------------------------------------------------------------
# Shared: arguments and checkpoints
# ----------------------------------------------------------------------------------------------


def parse_list(text: str, kind, flag: str) -> list:
    """"0.5,0.9" -> [0.5, 0.9]; an HVAEError naming ``flag`` for anything else."""
    try:
        vals = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals:
        raise HVAEError(f"{flag} expects a comma-separated list of {kind.__name__}s, got {text!r}: e.g. {flag} "
                        + ("0.5,0.9,1" if kind is float else "1,5,10"))
    return vals


def check_rhos(rhos, flag: str = "--rho") -> list:
    for r in rhos:
        if not 0.0 <= r <= 1.0:
            raise HVAEError(f"rho must lie in [0, 1], got {r}: pass {flag} values between 0 and 1 (1 = no smoothing)")
    return rhos


def checkpoint_files(run_dir, paths, every: int) -> list:
    """[(step, path)] sorted by step: ``paths`` (files, or folders whose *.pt files are taken);
    none given and every > 0: the run directory's own checkpoints. Duplicate steps count once."""
    if every < 0:
        raise HVAEError(f"--every must be >= 0, got {every}: pass the step interval between checkpoints")
    if not paths:
        paths = [Path(run_dir)]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.pt"))
        elif p.is_file():
            files.append(p)
        else:
            raise HVAEError(f"checkpoint {p} does not exist: pass checkpoint files or folders of them to --checkpoints")
    by_step = {}
    for f in files:
        st = load_checkpoint(f, "cpu", keys=("model",))
        by_step.setdefault(int(st.get("step", 0)), f)
    steps = sorted(s for s in by_step if every == 0 or s % every == 0)
    if not steps:
        raise HVAEError(f"no checkpoint with a step that is a multiple of --every {every} among {len(files)} files: "
                        f"lower --every or pass more --checkpoints")
    return [(s, by_step[s]) for s in steps]


def _load_into(model, path: Path) -> None:
    try:
        model.load_state_dict(load_checkpoint(path, "cpu", keys=("model",))["model"])
    except (RuntimeError, KeyError) as exc:
        raise HVAEError(f"checkpoint {path} does not match the run's model: {str(exc).splitlines()[0]}; "
                        f"pass checkpoints of this run") from exc


def _checkpoint_models(args):
    """Yield (cfg, model, device, step, label) for every checkpoint the command names. Every model
    (the stacked VAE, LVAE, BIVA, the VDVAE-style ladder) exposes its generator layers the same way (``StackedVAE``'s
    generator_head, generator_inputs, generator_parameters), so the diagnostics read them all."""
    cfg, model, dev, step = load_run(args.run_dir, args.device, args.which)
    if model.depth < 2:
        raise HVAEError("the model has one stochastic layer, so no generator layer is smoothed: pass a deeper run")
    if model.cfg.skip:
        raise HVAEError("the diagnostics do not support skip connections (HVAE+) yet: pass a run without them")
    if not args.checkpoints and not args.every:
        yield cfg, model, dev, step, f"checkpoint-{args.which}"
        return
    for s, path in checkpoint_files(args.run_dir, args.checkpoints, args.every):
        _load_into(model, path)
        yield cfg, model, dev, s, str(path)


def _batches(cfg, args, device) -> list:
    """The fixed minibatches: the first ``args.batches`` of the training stream with ``args.seed``."""
    from ..data import BatchStream, load_dataset

    ds = load_dataset(cfg.dataset, "train", args.data_dir)
    stream = BatchStream(ds, args.batch_size or cfg.train.batch_size, seed=args.seed)
    return [next(stream).to(device) for _ in range(args.batches)]


def _layer_names(model) -> list:
    return [f"p(z_{i + 1}|z_{i + 2})" for i in range(model.depth - 1)]


# ----------------------------------------------------------------------------------------------
# gradvar
# ----------------------------------------------------------------------------------------------


def draw_seed(seed: int, tag: str, batch: int, draw: int) -> int:
    """The torch seed of one gradient draw; ``tag`` names the estimator ("ref", "rho=..,K=..")."""
    h = hashlib.blake2b(repr((seed, tag, batch, draw)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def gradient_draws(loss_fn, groups, x, draws: int, seed: int, tag: str, batch: int) -> list:
    """Per group, the flattened gradients of ``draws`` noise draws of loss_fn(x): list of [draws, P_g]
    float64. Draw d runs under torch.manual_seed(draw_seed(seed, tag, batch, d)), so all noise
    (posterior samples and OU seeds) comes from that seed."""
    params = [p for g in groups for p in g]
    out = [torch.empty(draws, sum(p.numel() for p in g), dtype=torch.float64) for g in groups]
    for d in range(draws):
        torch.manual_seed(draw_seed(seed, tag, batch, d))
        grads = torch.autograd.grad(loss_fn(x), params, allow_unused=True)
        i = 0
        for gi, g in enumerate(groups):
            flat = [(grads[i + j] if grads[i + j] is not None else torch.zeros_like(p)).reshape(-1)
                    for j, p in enumerate(g)]
            out[gi][d] = torch.cat(flat).double().cpu()
            i += len(g)
    return out


def _quad(M):
    """a^T M a for a = the mean weights of all D rows (index 0) and of all rows but d (index d + 1): [D + 1]."""
    D = M.shape[0]
    T, rows, cols, diag = M.sum(), M.sum(1), M.sum(0), np.diag(M)
    return np.concatenate([[T / D**2], (T - rows - cols + diag) / (D - 1) ** 2])


def _variance(M):
    """Trace of the sample covariance of the rows from their Gram matrix M [D, D]; all rows (index 0)
    and all rows but d (index d + 1): [D + 1]."""
    D, diag = M.shape[0], np.diag(M)
    n = np.concatenate([[D], np.full(D, D - 1)])
    trace = np.concatenate([[diag.sum()], diag.sum() - diag])
    return (trace - n * _quad(M)) / (n - 1), n


def _jackknife(vals):
    """(estimate, standard error) from [full, leave-one-out_1..D]: the delete-one jackknife."""
    full, loo = vals[0], vals[1:]
    D = len(loo)
    return float(full), float(math.sqrt((D - 1) / D * ((loo - loo.mean()) ** 2).sum()))


def _bias_sq(grams, idx) -> float:
    """Unbiased mean over batches of ||E c - E r||^2 from the draws ``idx``:
    ||mean_c - mean_r||^2 - V_c / n - V_r / n."""
    n, tot = len(idx), 0.0

    def quad(m):
        return m.sum() / n**2

    def var(m):
        return (np.trace(m) - m.sum() / n) / (n - 1)

    for cc, cr, rr in grams:
        cc, cr, rr = (m[np.ix_(idx, idx)] for m in (cc, cr, rr))
        tot += quad(cc) - 2 * quad(cr) + quad(rr) - (var(cc) + var(rr)) / n
    return tot / len(grams)


def variance_and_bias(grams, groups: int = 8) -> dict:
    """Statistics of one estimator against the reference, from per-batch Gram matrices.

    ``grams``: list over batches of (M_cc, M_cr, M_rr), the [D, D] Gram blocks of the estimator's
    draws (c) and the reference's (r); draw d of c and of r are independent, and the pairs are iid
    over d.
      variance: mean over batches of the trace of the covariance of c's gradient; standard error
                by the delete-one jackknife over d
      bias_sq:  mean over batches of ||E c - E r||^2, unbiased; standard error by batch means over
                ``groups`` disjoint groups of draws (conservative: the full estimate also uses the
                pairs across groups). The jackknife is no use here: at zero bias the estimate is a
                degenerate U-statistic and the jackknife underestimates its spread.
      bias:     sqrt(max(bias_sq, 0)); its stderr sqrt(max(bias_sq, 0) + se) - bias is the
                delta method's se / (2 bias) when the bias is clear, and sqrt(se) (the smallest
                bias the draws can resolve) near zero.
    """
    var = 0.0
    for cc, _, _ in grams:
        var = var + _variance(cc)[0] / len(grams)
    v, v_se = _jackknife(var)
    D = grams[0][0].shape[0]
    G = min(groups, D // 2)
    b2 = _bias_sq(grams, np.arange(D))
    parts = [_bias_sq(grams, idx) for idx in np.array_split(np.arange(D), G)]
    b2_se = float(np.std(parts, ddof=1) / math.sqrt(G))
    b = math.sqrt(max(b2, 0.0))
    return {"variance": v, "variance_stderr": v_se, "bias": b, "bias_stderr": math.sqrt(b * b + b2_se) - b,
            "bias_sq": float(b2), "bias_sq_stderr": b2_se}


def gradvar(loss_fn, groups, names, batches, rhos, Ks, draws: int, seed: int = 0, progress=None) -> dict:
    """Gradient variance and bias of loss_fn(x, rho, K) for every (rho, K), over fixed ``batches``.

    ``loss_fn(x, None, None)`` is the reference (plain VAE) estimator. ``groups``: one list of
    parameters per layer (``names``); the totals are over all groups. Returns {"points": [...],
    "reference": {...}}; variances are traces of covariances (squared gradient units), bias is a
    distance in the same parameter space.
    """
    if draws < 4:
        raise HVAEError(f"--draws must be >= 4 (two groups of two for the bias's standard error), got {draws}")
    n_groups = len(groups)
    grams = {}  # (tag, group) -> list over batches of (cc, cr, rr); the total is the sum over groups
    configs = [(None, None)] + [(r, k) for r in rhos for k in Ks]
    for b, x in enumerate(batches):
        ref = gradient_draws(lambda x: loss_fn(x, None, None), groups, x, draws, seed, "ref", b)
        for rho, K in configs:
            tag = "ref" if rho is None else f"rho={rho},K={K}"
            cur = ref if rho is None else gradient_draws(lambda x: loss_fn(x, rho, K), groups, x, draws, seed, tag, b)
            for g in range(n_groups):
                blocks = tuple((a @ c.T).numpy() for a, c in ((cur[g], cur[g]), (cur[g], ref[g]), (ref[g], ref[g])))
                grams.setdefault((tag, g), []).append(blocks)
            if progress is not None:
                progress.update(1)

    def stats(tag):
        per = [variance_and_bias(grams[(tag, g)]) for g in range(n_groups)]
        total = variance_and_bias([tuple(sum(grams[(tag, g)][b][j] for g in range(n_groups)) for j in range(3))
                                   for b in range(len(batches))])
        layers = [{"layer": nm, "params": sum(p.numel() for p in grp), **s} for nm, grp, s in zip(names, groups, per)]
        return {(k if k.endswith("_stderr") else k + "_total"): v for k, v in total.items()} | {"per_layer": layers}

    points = [{"rho": rho, "K": K, **stats(f"rho={rho},K={K}")} for rho, K in configs[1:]]
    # The reference's own bias is zero by definition: keep only its variance.
    ref = stats("ref")
    ref = {k: v for k, v in ref.items() if not k.startswith("bias")} | {
        "per_layer": [{k: v for k, v in lay.items() if not k.startswith("bias")} for lay in ref["per_layer"]]}
    return {"points": points, "reference": ref}


def model_loss_fn(model, backend, target: str = "mean-std", method: str = "hvae"):
    """loss_fn(x, rho, K) of `gradvar`: the negative OU-smoothed ELBO (batch mean) of a model of
    ``method`` (hvae for the stacked VAE, whatever its run's method; lvae; biva; ladder), or with rho None the
    negative ELBO (the plain VAE estimator)."""
    from ..models.model import OUSmoothing

    def loss(x, rho, K):
        ou = None if rho is None else OUSmoothing(rho, K, backend, target)
        return training_loss(model, x, method, ou, 1.0, 0.0, 1)[0]

    return loss


def cmd_gradvar(args) -> int:
    from tqdm.auto import tqdm

    from ..ops.ou import get_backend

    rhos = check_rhos(parse_list(args.rho, float, "--rho"))
    Ks = parse_list(args.K, int, "--K")
    if min(Ks) < 1:
        raise HVAEError(f"K must be >= 1, got {min(Ks)}: pass --K values of 1 or more (correlated samples per posterior sample)")
    if args.batches < 1 or args.draws < 4:
        raise HVAEError(f"--batches must be >= 1 and --draws >= 4, got {args.batches} and {args.draws}")
    result = {"run_dir": str(args.run_dir), "batches": args.batches, "draws": args.draws, "seed": args.seed,
              "objective": "negative ELBO, batch mean (nats per example); gradients of each generator layer's parameters",
              "points": [], "reference": []}
    bar = None
    for cfg, model, dev, step, label in _checkpoint_models(args):
        batches = _batches(cfg, args, dev)
        result["batch_size"] = int(batches[0].shape[0])
        if bar is None:
            bar = tqdm(total=0, disable=args.no_progress, unit="estimator-batch", desc="gradvar")
        bar.total += len(batches) * (1 + len(rhos) * len(Ks))
        bar.refresh()
        # The K correlated samples of the widest latent layer alone (float32) must fit.
        widest = max(math.prod(s) for s in model.latent_shapes)
        check_fits(4.0 * max(Ks) * result["batch_size"] * widest, dev,
                   f"--K {max(Ks)} OU samples of {result['batch_size']} examples", "lower --K")
        groups = [model.generator_parameters(i) for i in range(model.depth - 1)]
        method = cfg.method if cfg.method in ("lvae", "biva", "ladder") else "hvae"  # vae/iwae runs are stacked VAEs too
        loss = model_loss_fn(model, get_backend("torch", dev), cfg.ou.target, method)
        with out_of_memory(f"with --K {max(Ks)} OU samples per example at batch size {result['batch_size']}: "
                           "lower --K (or --batch-size)"):
            res = gradvar(loss, groups, _layer_names(model), batches, rhos, Ks, args.draws, args.seed, bar)
        result["points"] += [{"step": step, "checkpoint": label, **p} for p in res["points"]]
        result["reference"].append({"step": step, "checkpoint": label, **res["reference"]})
    if bar is not None:
        bar.close()
    for p in result["points"]:
        print(f"step {p['step']:>7}  rho {p['rho']:<5} K {p['K']:<3} variance {p['variance_total']:.4g} "
              f"+- {p['variance_stderr']:.2g}  bias {p['bias_total']:.4g} +- {p['bias_stderr']:.2g}")
    for r in result["reference"]:
        print(f"step {r['step']:>7}  plain VAE gradient: variance {r['variance_total']:.4g} +- {r['variance_stderr']:.2g}")
    _write_outputs(result, args, plot_gradvar)
    return 0


def plot_gradvar(result: dict, output: Path) -> Path:
    """Variance against bias, one panel per layer and one for the total; a line per (step, K)
    through its rhos, each point labelled with its rho, with standard-error bars."""
    plt = _pyplot()
    names = [lay["layer"] for lay in result["points"][0]["per_layer"]] + ["total"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    series = sorted({(p["step"], p["K"]) for p in result["points"]})
    multi_step = len({s for s, _ in series}) > 1
    for j, name in enumerate(names):
        ax = axes[0, j]
        for step, K in series:
            pts = sorted((p for p in result["points"] if p["step"] == step and p["K"] == K), key=lambda p: p["rho"])
            get = (lambda p, k: p[k + "_total"]) if name == "total" else (lambda p, k: p["per_layer"][j][k])
            xs, ys = [get(p, "bias") for p in pts], [get(p, "variance") for p in pts]
            err = (lambda p, k: p[k]) if name == "total" else (lambda p, k: p["per_layer"][j][k])
            ax.errorbar(xs, ys, xerr=[err(p, "bias_stderr") for p in pts], yerr=[err(p, "variance_stderr") for p in pts],
                        marker="o", capsize=2, label=f"K={K}" + (f", step {step}" if multi_step else ""))
            for p, xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{p['rho']:g}", (xv, yv), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(title=name, xlabel="bias: |E grad - E grad(rho=1)|", ylabel="gradient variance (trace)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, output)


# ----------------------------------------------------------------------------------------------
# spectrum
# ----------------------------------------------------------------------------------------------

# Defaults sized by tests/test_spectrum.py: with these, unit-energy h_1..h_5 and their mixtures are
# recovered within 0.05 of their energy (h_5, the heaviest-tailed, sets the size).
SPECTRUM_POINTS, SPECTRUM_NOISE, SPECTRUM_ANGLES = 2000, 1000, 12
_CHUNK_EVALS = 1 << 18  # evaluations of f per chunk of points (bounds memory)


def circle_rhos(angles: int) -> np.ndarray:
    """The rho grid of ``angles`` points on a circle: cos(2 pi k / angles), k = 0..angles // 2."""
    return np.cos(2 * np.pi * np.arange(angles // 2 + 1) / angles)


def noise_stability(f, mu, sigma, noise: int, angles: int = SPECTRUM_ANGLES, generator=None, state=()) -> dict:
    """The noise stability of f around each point, per output unit, with its covariance.

    f maps z [N', *S] (and the rows of ``state`` that go with them: each tensor of ``state`` is
    [N, ...], per point, repeated for every evaluation) to [N', *T]; it is evaluated at
    z = mu + sigma x (mu, sigma [N, *S]). Each
    of the ``noise`` draws per point is a circle x_j = e cos(t_j) + w sin(t_j), t_j = 2 pi j /
    angles, e, w ~ N(0, I): every x_j is N(0, I) and x_j, x_{j+k} are rho_k = cos(2 pi k / angles)
    correlated, so one draw of ``angles`` evaluations yields ``angles`` products at every rho of
    circle_rhos (far less variance than one product per rho; the grid on [-1, 1] keeps the fit
    well conditioned). Returns float64 arrays: ``rhos`` [R]; ``S`` [R], the estimate of
    S(rho) - W_0 = E[(f(x) - E f) . (f(x') - E f)] / units, unbiased (a U-statistic over the draws);
    ``cov`` [R, R], its covariance; ``W0`` = mean over points of |E f|^2 / units (unbiased) and
    ``W0_stderr``. Standard errors treat the points' draws as independent samples, so they include
    the spread over the points.
    """
    if noise < 2:
        raise HVAEError(f"--noise must be >= 2, got {noise}")
    N, R = mu.shape[0], angles // 2 + 1
    t = torch.arange(angles, dtype=torch.float64) * (2 * math.pi / angles)
    cos, sin = (v.to(mu.dtype).to(mu.device).view(-1, 1, 1, *[1] * (mu.dim() - 1)) for v in (t.cos(), t.sin()))
    step = max(1, _CHUNK_EVALS // (noise * angles))
    s1, s2, w0 = torch.zeros(R, dtype=torch.float64), torch.zeros(R, R, dtype=torch.float64), []
    for a in range(0, N, step):
        m, s = mu[a:a + step], sigma[a:a + step]
        e = torch.randn((noise, *m.shape), generator=generator, dtype=mu.dtype, device=mu.device)
        w = torch.randn((noise, *m.shape), generator=generator, dtype=mu.dtype, device=mu.device)
        x = e[None] * cos + w[None] * sin  # [angles, noise, n, *S]
        rows = [t[a:a + step].repeat(angles * noise, *[1] * (t.dim() - 1)) for t in state]  # point-minor, as z
        F = f((m + s * x).flatten(0, 2), *rows).reshape(angles, noise, m.shape[0], -1).double()
        units = F.shape[-1]
        circle = F.mean(0)  # [noise, n, units]: each draw's mean over its circle
        total = circle.sum(0)
        # W_0 per point: sum over pairs of different draws of circle_k . circle_l (unbiased for |E f|^2)
        w0.append(((total * total).sum(-1) - (circle * circle).sum((0, -1))) / (noise * (noise - 1) * units))
        G = F - total / noise  # centred on the point's mean over all its evaluations
        gbar = circle - total / noise
        # per draw k: mean_j G_j . G_{j+lag} + |gbar_k|^2 / (noise - 1): the second term undoes the
        # centring's bias, so the mean over draws is unbiased for S(rho) - W_0
        P = torch.stack([(G * G.roll(-k, 0)).sum(-1).mean(0) for k in range(R)], -1)
        P = (P + (gbar * gbar).sum(-1)[..., None] / (noise - 1)).reshape(-1, R) / units
        s1 += P.sum(0).cpu()
        s2 += (P.T @ P).cpu()
    n = N * noise
    S = s1 / n
    cov = (s2 / n - torch.outer(S, S)) * (n / (n - 1)) / n
    w0 = torch.cat(w0).cpu()
    return {"rhos": circle_rhos(angles), "S": S.numpy(), "cov": cov.numpy(), "W0": w0.mean().item(),
            "W0_stderr": (w0.std() / math.sqrt(N)).item() if N > 1 else math.nan}


def fit_spectrum(rhos, S, degree: int, cov=None, W0: float = 0.0, W0_stderr: float = 0.0) -> dict:
    """W_1..W_degree >= 0 minimising ||A W - S||, A[j, d] = rhos[j]^d (scipy's NNLS); S is the
    stability without W_0 (noise_stability's), W0 the constant term estimated beside it.

    Returns W (W_0 first), W_stderr (from ``cov`` through the unconstrained least-squares fit, which
    the NNLS estimate equals where no energy is clamped at 0; None without ``cov``), the variance
    sum_{d>=1} W_d, the fraction of it above degree 1, the residual norm and the condition number of A.
    """
    from scipy.optimize import nnls

    if degree < 1:
        raise HVAEError(f"--degree must be >= 1, got {degree}")
    if len(rhos) < degree + 1:
        raise HVAEError(f"{len(rhos)} rho values cannot determine {degree + 1} Hermite energies: "
                        f"pass --angles >= {2 * degree} or lower --degree")
    A = np.power.outer(np.asarray(rhos, float), np.arange(1, degree + 1))
    W, resid = nnls(A, np.asarray(S, float))
    se = None
    if cov is not None:
        P = np.linalg.pinv(A)
        se = [float(W0_stderr)] + np.sqrt(np.clip(np.diag(P @ np.asarray(cov) @ P.T), 0, None)).tolist()
    var = float(W.sum())
    return {"W": [float(W0)] + W.tolist(), "W_stderr": se, "variance": var,
            "frac_above_degree_1": float(W[1:].sum() / var) if var > 0 else 0.0,
            "residual": float(resid), "condition_number": float(np.linalg.cond(A))}


@torch.no_grad()
def layer_spectra(model, x, degree: int, noise: int, angles: int = SPECTRUM_ANGLES, seed: int = 0) -> list:
    """The spectrum of every generator layer's mean mu_i, in the coordinates of the posterior that
    drew z_{i+1} (the stacked VAE: q(z_{i+1} | z_i); a ladder: its top-down posterior) in one
    posterior sample of each example of ``x``. A ladder's top-down state (h_{i+1}, block outputs)
    stays at its value for that sample: only z_{i+1} moves, as in the OU smoothing."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    torch.manual_seed(seed)
    inputs = {i: (q, state) for i, _, q, _, state in model.generator_inputs(x)}
    out = []
    for i, name in enumerate(_layer_names(model)):
        (mu, sigma), state = inputs[i]
        f = lambda z, *st, i=i: model.generator_head(i, z, *st)[0]  # noqa: E731
        st = noise_stability(f, mu, sigma, noise, angles, gen, state=tuple(state))
        fit = fit_spectrum(st["rhos"], st["S"], degree, st["cov"], st["W0"], st["W0_stderr"])
        out.append({"layer": name, "units": int(np.prod(model.latent_shapes[i])), **fit, "rhos": st["rhos"].tolist(),
                    "stability": (st["S"] + st["W0"]).tolist(),
                    "stability_stderr": np.sqrt(np.diag(st["cov"]) + st["W0_stderr"] ** 2).tolist()})
    return out


def cmd_spectrum(args) -> int:
    from tqdm.auto import tqdm

    from ..data import eval_batches, load_dataset

    if args.points < 1 or args.noise < 2 or args.angles < 2:
        raise HVAEError(f"--points must be >= 1, --noise >= 2 and --angles >= 2, got {args.points}, {args.noise} "
                        f"and {args.angles}")
    rhos = circle_rhos(args.angles)
    fit_spectrum(rhos, np.zeros(len(rhos)), args.degree)  # checks degree against the grid before any work
    result = {"run_dir": str(args.run_dir), "rhos": rhos.tolist(), "degree": args.degree, "points": args.points,
              "noise": args.noise, "angles": args.angles, "seed": args.seed, "split": args.split, "checkpoints": []}
    # The generator reloads one model in place: consume it lazily.
    for cfg, model, dev, step, label in tqdm(_checkpoint_models(args), disable=args.no_progress, desc="spectrum",
                                             unit="checkpoint"):
        ds = load_dataset(cfg.dataset, args.split, args.data_dir)
        x = torch.cat(list(eval_batches(ds, min(args.points, 500), args.seed, args.points))).to(dev)
        # noise_stability evaluates a layer on one chunk of points at a time: angles x noise draws of
        # each of its points, at least one point; the chunk's inputs and outputs (float32) must fit.
        sizes = [math.prod(s) for s in model.latent_shapes]
        chunk = min(x.shape[0], max(1, _CHUNK_EVALS // (args.noise * args.angles)))
        check_fits(4.0 * args.angles * args.noise * chunk * max(a + b for a, b in zip(sizes, sizes[1:] or sizes)),
                   dev, f"--noise {args.noise} draws on --angles {args.angles} of one point", "lower --noise")
        with out_of_memory(f"with --noise {args.noise} draws for each of --points {args.points}: lower --noise "
                           "(or --points)"):
            layers = layer_spectra(model, x, args.degree, args.noise, args.angles, args.seed)
        result["checkpoints"].append({"step": step, "checkpoint": label, "layers": layers})
        result["condition_number"] = layers[0]["condition_number"]
        for lay in layers:
            W = " ".join(f"{w:.3g}±{s:.1g}" for w, s in zip(lay["W"], lay["W_stderr"]))
            print(f"step {step:>7}  {lay['layer']:<12} W_0..{args.degree}: {W}  above degree 1: "
                  f"{100 * lay['frac_above_degree_1']:.1f}% of the variance")
    print(f"fit: degree {args.degree}, {len(rhos)} rho values, condition number {result['condition_number']:.3g}")
    _write_outputs(result, args, plot_spectrum)
    return 0


def plot_spectrum(result: dict, output: Path) -> Path:
    """One panel per layer: the share of the variance at each degree 1..D (error bars: one standard
    error), a bar group per checkpoint."""
    plt = _pyplot()
    cks = result["checkpoints"]
    names = [lay["layer"] for lay in cks[0]["layers"]]
    D = result["degree"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    width = 0.8 / len(cks)
    for j, name in enumerate(names):
        ax = axes[0, j]
        for c, ck in enumerate(cks):
            lay = ck["layers"][j]
            scale = 1 / lay["variance"] if lay["variance"] > 0 else 0.0
            share = np.array(lay["W"][1:]) * scale
            err = np.array(lay["W_stderr"][1:]) * scale if lay.get("W_stderr") else None  # older JSON: none
            ax.bar(np.arange(1, D + 1) + (c - (len(cks) - 1) / 2) * width, share, width, yerr=err, capsize=2,
                   label=f"step {ck['step']}: {100 * lay['frac_above_degree_1']:.0f}% above 1")
        ax.set(title=name, xlabel="Hermite degree d", ylabel="W_d / variance", ylim=(0, 1.05), xticks=range(1, D + 1))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(fig, output)


# ----------------------------------------------------------------------------------------------
# Output and the command line
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, output: Path) -> Path:
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    _pyplot().close(fig)
    return output


def _write_outputs(result: dict, args, plot) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")


def _common_args(p) -> None:
    p.add_argument("run_dir", type=Path, help="a `hvae-fast train` output folder")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="the run's checkpoint to read")
    p.add_argument("--checkpoints", nargs="+", type=Path, metavar="PATH",
                   help="checkpoint files or folders of *.pt files to evaluate instead (same model as the run)")
    p.add_argument("--every", type=int, default=0, metavar="N",
                   help="evaluate every checkpoint whose step is a multiple of N (from --checkpoints, else the run folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir")
    # Checked as the flags are read, so a bad path is refused before the work, not after it.
    p.add_argument("--json", type=output_type(".json"), metavar="FILE.json")
    p.add_argument("--plot", type=output_type(*PLOT_EXTS), metavar="FILE.png")
    p.add_argument("--no-progress", action="store_true")


def register(sub) -> None:
    """Register `gradvar` and `spectrum`."""
    g = sub.add_parser("gradvar", help="gradient variance and bias of the smoothed ELBO against rho and K")
    _common_args(g)
    g.add_argument("--rho", default="0.5,0.7,0.9,1.0", help="comma-separated rho values in [0, 1]")
    g.add_argument("--K", default="1,5,10", help="comma-separated numbers of OU samples")
    g.add_argument("--batches", type=int, default=4, help="fixed training minibatches")
    g.add_argument("--batch-size", type=int, default=0, help="default: the run's batch size")
    g.add_argument("--draws", type=int, default=32, help="noise draws per minibatch and estimator")
    g.set_defaults(func=cmd_gradvar)

    s = sub.add_parser("spectrum", help="Hermite spectrum of each generator layer by noise stability")
    _common_args(s)
    s.add_argument("--degree", type=int, default=5, help="highest Hermite degree D fitted")
    s.add_argument("--points", type=int, default=SPECTRUM_POINTS, help="data points (first N of the split)")
    s.add_argument("--noise", type=int, default=SPECTRUM_NOISE, help="noise draws (e, w) per data point")
    s.add_argument("--angles", type=int, default=SPECTRUM_ANGLES, metavar="M",
                   help="evaluations per draw, on a circle: the fit's rho grid is cos(2 pi k / M), k = 0..M/2")
    s.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    s.set_defaults(func=cmd_spectrum)
