"""Evaluation of a trained model with the unsmoothed generator: ELBO, IW bound, per-layer KL,
active units, bits/dim; the ``eval-<split>.json`` report."""

from __future__ import annotations

import torch

from ..models.likelihoods import bits_per_dim
from ..models.objectives import iw_bound, repeat_batch


@torch.no_grad()
def active_units(model, batches, device, samples: int = 10, threshold: float = 0.01, reduce=None) -> list:
    """Active units per layer, bottom to top (Burda et al. 2016).

    Unit u of layer i is active if Cov_x(E_{q(z_i|x)}[u]) > threshold. For z_1 the expectation is
    the posterior mean mu_1(x); for a higher layer it also integrates over the other sampled layers
    it reads (the ones below in the stacked model, the ones above in a ladder, whose posteriors
    share the top-down pass), which we estimate from ``samples`` >= 2 independent draws of the
    hierarchy per x. The variance over x of the per-x average alone would count that sampling noise
    too (Var(mu | x) / samples: a collapsed ladder layer, q = p(z_i | z_{i+1}), looks active when
    its prior's mean moves with the sample above), so the within-x variance over ``samples`` is
    subtracted: the one-way random-effects estimator, unbiased for Cov_x(E[u | x]). Over every
    example in ``batches`` (two-pass, in float64). Conv latents count each C*H*W element.
    ``reduce`` sums a tensor over the processes that share the examples (data-parallel training).
    """
    if samples < 2:
        raise ValueError(f"active_units needs samples >= 2 to separate the posterior's own noise, got {samples}")
    reduce = reduce or (lambda t: t)
    means = within = None
    for x in batches:
        x = x.to(device)
        t = model(repeat_batch(x, samples))
        draws = [m.view(samples, x.shape[0], -1).double() for m in t.q_mean]
        per_layer = [d.mean(0) for d in draws]
        noise = [d.var(0, unbiased=True).sum(0) for d in draws]  # summed over this batch's examples
        means = [[p] for p in per_layer] if means is None else [a + [p] for a, p in zip(means, per_layer)]
        within = noise if within is None else [w + v for w, v in zip(within, noise)]
    out = []
    for layer, w in zip(means, within):
        m = torch.cat(layer, 0)
        n = reduce(m.new_tensor(m.shape[0]))
        mean = reduce(m.sum(0)) / n
        var = reduce(((m - mean) ** 2).sum(0)) / n - reduce(w) / n / samples
        out.append(int((var > threshold).sum().item()))
    return out


@torch.no_grad()
def evaluate(model, batches_fn, device, iw_samples: int = 0, iw_chunk: int = 500, au_samples: int = 10,
             seed: int = 0, progress: bool = False, num_batches: int | None = None, reduce=None) -> dict:
    """Evaluate ``model`` on the batches yielded by ``batches_fn()`` (called once per pass).

    Returns nats per example: ``elbo``, ``recon`` (E_q log p(x|z)), ``kl_total``, ``kl_per_layer``
    (bottom to top), ``active_units``, ``iw_bound`` (if iw_samples > 0), ``num_examples``, and
    ``bpd`` keys for image likelihoods over [-1, 1] (CIFAR-10).
    Runs under its own RNG stream (``seed``), so it never perturbs a training run's randomness.
    ``progress`` shows a bar per pass (with an ETA when ``num_batches``, the batches per pass, is given).
    ``reduce`` (data-parallel training) sums a float64 tensor over the processes, each of which
    passes its own share of the examples; the results are then those of all the examples.
    """
    was_training = model.training
    model.eval()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        n, sums = 0, {"elbo": 0.0, "recon": 0.0, "iw": 0.0}
        kl_sum = None
        def passes(desc):
            if not progress:
                return batches_fn()
            from tqdm.auto import tqdm

            return tqdm(batches_fn(), desc=desc, unit="batch", total=num_batches, dynamic_ncols=True)

        it = passes("ELBO" + (f" + IW bound (L={iw_samples})" if iw_samples > 0 else ""))
        num_dims = None
        for x in it:
            x = x.to(device)
            num_dims = x[0].numel()
            t = model(x)
            n += x.shape[0]
            sums["elbo"] += t.log_weight.double().sum().item()
            sums["recon"] += t.log_px.double().sum().item()
            kls = [k.double().sum().item() for k in t.kl]
            kl_sum = kls if kl_sum is None else [a + b for a, b in zip(kl_sum, kls)]
            if iw_samples > 0:
                sums["iw"] += iw_bound(model, x, iw_samples, iw_chunk).double().sum().item()
        au = active_units(model, passes("active units"), device, samples=au_samples, reduce=reduce)
    model.train(was_training)
    if reduce is not None:
        tot = reduce(torch.tensor([n, sums["elbo"], sums["recon"], sums["iw"], *kl_sum], dtype=torch.float64))
        n, sums["elbo"], sums["recon"], sums["iw"], *kl_sum = tot.tolist()
        n = int(n)
    res = {
        "elbo": sums["elbo"] / n,
        "recon": sums["recon"] / n,
        "kl_per_layer": [k / n for k in kl_sum],
        "kl_total": sum(kl_sum) / n,
        "active_units": au,
        "num_examples": n,
        "iw_samples": iw_samples,
    }
    res["top_kl"] = res["kl_per_layer"][-1]
    if iw_samples > 0:
        res["iw_bound"] = sums["iw"] / n
    if getattr(model.likelihood, "kind", None) == "logistic":
        res["bpd"] = bits_per_dim(-res.get("iw_bound", res["elbo"]), num_dims)
        res["bpd_elbo"] = bits_per_dim(-res["elbo"], num_dims)
    return res


def format_table(res: dict) -> str:
    """A human-readable table of an evaluation result."""
    rows = [("split", res.get("split", "")), ("examples", res["num_examples"]), ("ELBO (nats)", f"{res['elbo']:.3f}")]
    if "iw_bound" in res:
        rows.append((f"IW bound, L={res['iw_samples']} (nats)", f"{res['iw_bound']:.3f}"))
    if "bpd" in res:
        rows.append(("bits/dim", f"{res['bpd']:.4f}"))
    rows += [("reconstruction", f"{res['recon']:.3f}"), ("KL total", f"{res['kl_total']:.3f}")]
    for i, (kl, au) in enumerate(zip(res["kl_per_layer"], res["active_units"])):
        rows.append((f"layer {i + 1}: KL / active units", f"{kl:.3f} / {au}"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
