"""Likelihood heads p(x | z_1): the decoder's output turned into a log-likelihood, samples and means.

Two families, both returning log-likelihoods in **nats summed over every non-batch dimension**
(one number per example, shape ``[B]``):

``bernoulli``
    Binary (or binarised) data, ``x`` in {0, 1}. The decoder outputs one logit per value:
    ``params`` has the shape of ``x``.

``logistic`` -- discretized mixture of logistics (Salimans et al. 2017, PixelCNN++)
    8-bit images rescaled to ``x`` in [-1, 1]: 256 levels ``-1 + 2k/255``, ``k = 0..255``, i.e.
    bins of width 2/255 centred on the levels. Per pixel, a mixture of ``n_mix`` components; in
    component ``m``, channel ``c`` is logistic with location ``mu[m, c]`` shifted linearly by the
    *earlier* channels (the autoregressive coupling, for RGB)::

        mean_R = mu_R
        mean_G = mu_G + c0 * x_R
        mean_B = mu_B + c1 * x_R + c2 * x_G        (c = tanh(raw coefficients))

    The probability of a level is the logistic mass of its bin, with the edge bins extended to
    -inf (at x = -1) and +inf (at x = +1), so the 256 probabilities sum to one per channel.

    Parameter layout, ``params: [B, dmol_num_params(n_mix, C), H, W]`` (``C = 3`` for RGB, where
    that is ``10 * n_mix``), split along dim 1 into consecutive blocks::

        logits      n_mix          mixture logits
        means       n_mix * C      viewed as [B, n_mix, C, H, W]
        log_scales  n_mix * C      viewed as [B, n_mix, C, H, W], clamped below at -7
        coeffs      n_mix * K      viewed as [B, n_mix, K, H, W], K = C(C-1)/2, tanh'd; the
                                   coefficient k couples the pairs (1,0), (2,0), (2,1), ... in
                                   that order, i.e. for RGB: c0 = G<-R, c1 = B<-R, c2 = B<-G.

    Any ``C >= 1`` works (``C = 1``: grayscale, no coupling), RGB is the intended use.

Use ``make_likelihood(kind, n_mix=10)`` to get an object with ``num_params(channels)``,
``logprob(params, x)``, ``sample(params, generator=None)`` and ``mean(params)``;
``bits_per_dim`` converts a negative log-likelihood in nats to bits per dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributions import fp32
from ..errors import HVAEError

__all__ = [
    "LIKELIHOODS",
    "BernoulliLikelihood",
    "LogisticMixtureLikelihood",
    "bernoulli_logprob",
    "bernoulli_mean",
    "bernoulli_sample",
    "bits_per_dim",
    "dmol_logprob",
    "dmol_mean",
    "dmol_num_params",
    "dmol_sample",
    "make_likelihood",
]

NUM_LEVELS = 256
HALF_BIN = 1.0 / 255.0  # half the bin width 2/255 on the [-1, 1] scale
LOG_SCALE_MIN = -7.0
TINY_MASS = 1e-5  # below this bin mass, use pdf(centre) * bin width (PixelCNN++)
EDGE = 0.999  # x < -EDGE is the level -1, x > EDGE the level +1


# --------------------------------------------------------------------------------------------
# Bernoulli


def bernoulli_logprob(logits: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x | sigmoid(logits)) in nats, summed over all non-batch dims.

    logits: [B, *S] (any real values; stable for |logits| large). x: [B, *S], values in {0, 1}
    (values in (0, 1) give the binary cross-entropy, which is not a normalised likelihood).
    Returns [B].
    """
    if logits.shape != x.shape:
        raise HVAEError(f"bernoulli_logprob: logits {tuple(logits.shape)} and x {tuple(x.shape)} differ")
    lp = -F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
    return lp.reshape(lp.shape[0], -1).sum(1)


def bernoulli_sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A draw x ~ Bernoulli(sigmoid(logits)): same shape and dtype as logits, values in {0, 1}."""
    return torch.bernoulli(torch.sigmoid(logits), generator=generator)


def bernoulli_mean(logits: Tensor) -> Tensor:
    """The mean sigmoid(logits): same shape as logits, values in [0, 1] (a viewable image)."""
    return torch.sigmoid(logits)


# --------------------------------------------------------------------------------------------
# Discretized mixture of logistics


def dmol_num_params(n_mix: int, channels: int = 3) -> int:
    """Decoder output channels for the discretized logistic mixture: ``10 * n_mix`` for RGB.

    n_mix * (1 logit + C means + C log-scales + C(C-1)/2 coupling coefficients).
    """
    if n_mix < 1 or channels < 1:
        raise HVAEError(f"dmol_num_params: need n_mix >= 1 and channels >= 1, got {n_mix}, {channels}")
    return n_mix * (1 + 2 * channels + channels * (channels - 1) // 2)


def _channels_from_params(num_params: int, n_mix: int) -> int:
    """Infer C from the parameter count (the count is strictly increasing in C)."""
    for c in range(1, 65):
        if dmol_num_params(n_mix, c) == num_params:
            return c
        if dmol_num_params(n_mix, c) > num_params:
            break
    raise HVAEError(
        f"discretized logistic mixture: {num_params} parameter channels fit no channel count for "
        f"n_mix={n_mix} (RGB needs {dmol_num_params(n_mix, 3)}); check n_mix and the decoder width"
    )


def _split(params: Tensor, n_mix: int, channels: int | None = None):
    """params [B, P, H, W] -> logits [B,M,H,W], means, log_scales [B,M,C,H,W], coeffs [B,M,K,H,W]."""
    if params.dim() != 4:
        raise HVAEError(f"discretized logistic mixture: params must be [B, P, H, W], got {tuple(params.shape)}")
    b, p, h, w = params.shape
    c = _channels_from_params(p, n_mix) if channels is None else channels
    if p != dmol_num_params(n_mix, c):
        raise HVAEError(
            f"discretized logistic mixture: params have {p} channels, {c}-channel data with "
            f"n_mix={n_mix} needs dmol_num_params={dmol_num_params(n_mix, c)}"
        )
    k = c * (c - 1) // 2
    logits, means, log_scales, coeffs = params.split([n_mix, n_mix * c, n_mix * c, n_mix * k], dim=1)
    means = means.reshape(b, n_mix, c, h, w)
    log_scales = log_scales.reshape(b, n_mix, c, h, w).clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(coeffs.reshape(b, n_mix, k, h, w))
    return logits, means, log_scales, coeffs


def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """mean_c = mu_c + sum_{j<c} coeff_(c,j) x_j. means [..., C, H, W], coeffs [..., K, H, W],
    x broadcastable to means (its channel dim aligned with C). Returns means' shape."""
    out, k = [], 0
    for c in range(means.shape[-3]):
        m = means[..., c, :, :]
        for j in range(c):
            m = m + coeffs[..., k, :, :] * x[..., j, :, :]
            k += 1
        out.append(m)
    return torch.stack(out, dim=-3)


def _log_bin_mass(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(level x) under a logistic(mean, exp(log_scale)) discretized to 256 bins on [-1, 1].

    Elementwise (broadcasting). Edge levels take the whole tail; interior bins whose mass is
    below TINY_MASS fall back to log(pdf(x) * 2/255), which is finite and has useful gradients.
    """
    inv_s = torch.exp(-log_scale)
    centred = x - mean
    plus_in = inv_s * (centred + HALF_BIN)
    min_in = inv_s * (centred - HALF_BIN)
    mid_in = inv_s * centred
    log_cdf_plus = F.logsigmoid(plus_in)  # log CDF(x + 1/255): the level -1
    log_sf_min = F.logsigmoid(-min_in)  # log(1 - CDF(x - 1/255)): the level +1
    # Bin mass as a difference of the two small tails (sigmoids <= 1/2), not of two numbers near 1.
    mass = torch.where(
        mid_in > 0,
        torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
        torch.sigmoid(plus_in) - torch.sigmoid(min_in),
    )
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    log_interior = torch.where(
        mass > TINY_MASS,
        torch.log(mass.clamp(min=1e-12)),
        log_pdf_mid + math.log(2.0 * HALF_BIN),
    )
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_sf_min, log_interior))


def dmol_logprob(params: Tensor, x: Tensor, n_mix: int) -> Tensor:
    """log p(x) in nats under the discretized logistic mixture, summed over pixels and channels.

    params: [B, dmol_num_params(n_mix, C), H, W] (layout in the module docstring).
    x: [B, C, H, W], values on the 256 levels -1 + 2k/255 (C = 3 for RGB). Returns [B].
    """
    if x.dim() != 4 or params.dim() != 4 or x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
        raise HVAEError(
            f"dmol_logprob: x must be [B, C, H, W] matching params [B, P, H, W] in B, H, W; "
            f"got x {tuple(x.shape)}, params {tuple(params.shape)}"
        )
    logits, means, log_scales, coeffs = _split(params, n_mix, x.shape[1])
    x = x.to(params.dtype).unsqueeze(1)  # [B, 1, C, H, W], broadcasts over components
    mean = _coupled_means(means, coeffs, x)
    log_mass = _log_bin_mass(x, mean, log_scales).sum(2)  # [B, M, H, W]
    per_pixel = torch.logsumexp(F.log_softmax(logits, dim=1) + log_mass, dim=1)  # [B, H, W]
    return per_pixel.sum((1, 2))


def _quantise(v: Tensor) -> Tensor:
    """Map reals to the nearest of the 256 levels (values outside [-1, 1] to the edge level)."""
    return torch.round((v + 1.0) * 127.5).clamp(0, NUM_LEVELS - 1) / 127.5 - 1.0


def _pick(t: Tensor, idx: Tensor) -> Tensor:
    """t [B, M, K, H, W], idx [B, H, W] component per pixel -> [B, K, H, W]."""
    b, _, k, h, w = t.shape
    return t.gather(1, idx[:, None, None].expand(b, 1, k, h, w)).squeeze(1)


def _coupled_channels(mu: Tensor, coef: Tensor, finish) -> Tensor:
    """Channel by channel: m_c = mu_c + sum_{j<c} coef_(c,j) x_j, then x_c = finish(c, m_c). [B, C, H, W]."""
    xs, k = [], 0
    for c in range(mu.shape[1]):
        m = mu[:, c]
        for j in range(c):
            m = m + coef[:, k] * xs[j]
            k += 1
        xs.append(finish(c, m))
    return torch.stack(xs, dim=1)


def dmol_sample(params: Tensor, n_mix: int, generator: torch.Generator | None = None) -> Tensor:
    """An exact draw x ~ p(x): [B, C, H, W] on the 256 levels in [-1, 1] (C inferred from params).

    Per pixel: a component by the Gumbel-max trick, then the channels in order, each a logistic
    draw around its coupled mean, quantised to its bin; later channels are coupled to the
    *quantised* earlier ones, matching what dmol_logprob conditions on.
    """
    logits, means, log_scales, coeffs = _split(params, n_mix)
    opts = dict(generator=generator, device=params.device, dtype=params.dtype)
    eps = torch.finfo(params.dtype).eps
    u = torch.rand(logits.shape, **opts).clamp(eps, 1 - eps)
    comp = torch.argmax(logits - torch.log(-torch.log(u)), dim=1)  # [B, H, W]
    mu, log_s, coef = _pick(means, comp), _pick(log_scales, comp), _pick(coeffs, comp)
    u = torch.rand(mu.shape, **opts).clamp(1e-5, 1 - 1e-5)
    noise = torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))  # logistic(0, s)
    return _coupled_channels(mu, coef, lambda c, m: _quantise(m + noise[:, c]))


def dmol_mean(params: Tensor, n_mix: int) -> Tensor:
    """A viewable image [B, C, H, W] in [-1, 1]: per pixel, the coupled mean of the component with
    the largest weight (earlier channels clamped to [-1, 1] before coupling). Not quantised."""
    logits, means, _, coeffs = _split(params, n_mix)
    comp = torch.argmax(logits, dim=1)
    mu, coef = _pick(means, comp), _pick(coeffs, comp)
    return _coupled_channels(mu, coef, lambda c, m: m.clamp(-1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Units


def bits_per_dim(nats_per_example: Tensor | float, num_dims: int) -> Tensor | float:
    """Negative log-likelihood in nats per example -> bits per dimension: nats / (num_dims ln 2).

    Pass the NLL (positive), e.g. ``-dmol_logprob(...)`` or a negative ELBO, and ``num_dims`` =
    C * H * W. For the discretized likelihoods here the probabilities are those of the discrete
    pixel values (256 bins over [-1, 1]), so no change-of-variables term (such as the
    log(255/2) nats per dim a continuous density on [-1, 1] would need) is added: a uniform model
    over the 256 levels gives 8 bits/dim.
    """
    return nats_per_example / (num_dims * math.log(2.0))


# --------------------------------------------------------------------------------------------
# Dispatch


class BernoulliLikelihood:
    """Bernoulli head: one logit per data value. Data in {0, 1}."""

    kind = "bernoulli"

    def num_params(self, channels: int) -> int:
        return channels

    def logprob(self, params: Tensor, x: Tensor) -> Tensor:
        return bernoulli_logprob(fp32(params), x)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return bernoulli_sample(params, generator)

    def mean(self, params: Tensor) -> Tensor:
        return bernoulli_mean(params)

    def __repr__(self) -> str:
        return "BernoulliLikelihood()"


class LogisticMixtureLikelihood:
    """Discretized mixture of ``n_mix`` logistics with channel coupling. Data in [-1, 1], 256 levels."""

    kind = "logistic"

    def __init__(self, n_mix: int = 10):
        if n_mix < 1:
            raise HVAEError(f"logistic likelihood: n_mix must be >= 1, got {n_mix}")
        self.n_mix = n_mix

    def num_params(self, channels: int) -> int:
        return dmol_num_params(self.n_mix, channels)

    def logprob(self, params: Tensor, x: Tensor) -> Tensor:
        return dmol_logprob(fp32(params), x, self.n_mix)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return dmol_sample(params, self.n_mix, generator)

    def mean(self, params: Tensor) -> Tensor:
        return dmol_mean(params, self.n_mix)

    def __repr__(self) -> str:
        return f"LogisticMixtureLikelihood(n_mix={self.n_mix})"


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "logistic": LogisticMixtureLikelihood}


def make_likelihood(kind: str, n_mix: int = 10):
    """The likelihood head named ``kind`` ("bernoulli" or "logistic"); n_mix is used by "logistic"."""
    if kind not in LIKELIHOODS:
        raise HVAEError(f"unknown likelihood {kind!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[kind]() if kind == "bernoulli" else LIKELIHOODS[kind](n_mix)
