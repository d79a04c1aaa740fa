"""Configs as dataclasses, and the preset registry named after the paper's experiments.

A run is fully described by a ``RunConfig`` (saved as ``config.json`` in the run directory). Presets
fill in the model and training settings of one experiment of the paper (see method.md,
"Configurations"); command-line flags override single fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .errors import HVAEError

METHODS = ("vae", "hvae", "iwae", "lvae", "biva")


@dataclass
class ModelConfig:
    """Architecture of the stacked hierarchical VAE. Lists run bottom (z_1, next to x) to top (z_L)."""

    arch: str = "mlp"  # "mlp" | "resnet"
    # MLP: units per stochastic layer, and the width of the two deterministic layers before each.
    latent_sizes: tuple = (40, 40, 40, 40)
    hidden_sizes: tuple = (200, 200, 200, 200)
    activation: str = "tanh"
    # ResNet: `channels` feature maps; `blocks` ResNet blocks in each net between stochastic layers;
    # `data_blocks` in the nets next to x (q(z_1|x) and p(x|z_1)); latents of `latent_channels`
    # maps at the feature resolution / `latent_stride`.
    num_layers: int = 4
    channels: int = 100
    blocks: int = 6
    data_blocks: int = 16
    latent_channels: int = 8
    latent_stride: int = 1
    skip: bool = False  # HVAE+: deterministic skip connections between generator layers
    # Likelihood p(x|z_1): "bernoulli" (binary images) or "logistic" (discretized logistic mixture).
    likelihood: str = "bernoulli"
    n_mix: int = 10
    # Gaussian layers: sigma = softplus(raw) + min_scale (method.md, open choices).
    min_scale: float = 1e-3

    @property
    def depth(self) -> int:
        return len(self.latent_sizes) if self.arch == "mlp" else self.num_layers


@dataclass
class OUConfig:
    """OU smoothing of the intermediate generator layers p(z_i | z_{i+1}), training only."""

    rho: float = 0.9
    samples: int = 5  # K
    target: str = "mean-std"  # "mean-std" | "ratio"
    backend: str = "auto"  # "auto" | "triton" | "cuda" | "cpp" | "torch"
    smooth_inference: bool = False  # also smooth q(z_{i+1} | z_i) (the paper: little benefit)
    # Recompute the K-sample generator activations in backward instead of storing them:
    # HVAE memory close to the VAE's, for one extra forward of the smoothed layers.
    recompute: bool = False


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "adamax"
    lr_schedule: str = "cosine"  # "constant" | "cosine" | "exponential"
    lr_decay: float = 0.1  # final lr = lr * lr_decay for cosine / exponential
    warmup_steps: int = 0
    grad_clip: float = 200.0  # max global grad norm; 0 disables
    seed: int = 0
    kl_anneal: tuple = (0, 0)  # (zero_steps, ramp_steps); (0, 0) = weight 1 throughout
    free_bits: float = 0.0  # nats per stochastic layer; 0 disables
    iw_samples_train: int = 1  # IWAE's k
    log_every: int = 50
    eval_every: int = 2000
    eval_examples: int = 2000  # validation examples per periodic evaluation (0 = all)
    sample_every: int = 5000
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0  # also checkpoint at least this often, so a slow run loses little


@dataclass
class RunConfig:
    dataset: str = "binarized-mnist"
    preset: str = "mnist-mlp-40x4"
    method: str = "hvae"
    model: ModelConfig = field(default_factory=ModelConfig)
    ou: OUConfig = field(default_factory=OUConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        def build(dc, values: dict):
            names = {f.name for f in dataclasses.fields(dc)}
            unknown = set(values) - names
            if unknown:
                raise HVAEError(f"config has unknown {dc.__name__} fields {sorted(unknown)}: was it written by another version?")
            return dc(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        d = dict(d)
        parts = {"model": ModelConfig, "ou": OUConfig, "train": TrainConfig}
        nested = {k: build(dc, d.pop(k, {})) for k, dc in parts.items()}
        return build(cls, {**d, **nested})

    def validate(self) -> "RunConfig":
        from .ou import OU_TARGETS, BACKEND_NAMES, check_ou_args

        if self.method not in METHODS:
            raise HVAEError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_ou_args(self.ou.rho, self.ou.samples)
        if self.ou.target not in OU_TARGETS:
            raise HVAEError(f"unknown --ou-target {self.ou.target!r}: choose one of {', '.join(OU_TARGETS)}")
        if self.ou.backend not in BACKEND_NAMES:
            raise HVAEError(f"unknown --backend {self.ou.backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
        t = self.train
        for name in ("steps", "batch_size", "iw_samples_train", "log_every", "eval_every", "checkpoint_every", "sample_every"):
            if getattr(t, name) < 1:
                raise HVAEError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
        if not (t.checkpoint_minutes > 0 and math.isfinite(t.checkpoint_minutes)):
            raise HVAEError(f"--checkpoint-minutes must be a positive number of minutes, got {t.checkpoint_minutes}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise HVAEError(f"--lr must be a positive number, got {t.lr}")
        if t.free_bits < 0:
            raise HVAEError(f"--free-bits must be >= 0 nats, got {t.free_bits}")
        if len(t.kl_anneal) != 2 or min(t.kl_anneal) < 0:
            raise HVAEError(f"--kl-anneal takes ZERO_STEPS,RAMP_STEPS (both >= 0), got {t.kl_anneal}")
        if t.optimizer not in ("adam", "adamax"):
            raise HVAEError(f"unknown optimizer {t.optimizer!r}: choose adam or adamax")
        if t.lr_schedule not in ("constant", "cosine", "exponential"):
            raise HVAEError(f"unknown lr schedule {t.lr_schedule!r}: choose constant, cosine or exponential")
        if self.model.arch == "mlp" and len(self.model.latent_sizes) != len(self.model.hidden_sizes):
            raise HVAEError("latent_sizes and hidden_sizes must have one entry per stochastic layer")
        return self


# ----------------------------------------------------------------------------------------------
# Presets: one per experiment of the paper (method.md, "Configurations")
# ----------------------------------------------------------------------------------------------

def _mlp(latents, hidden, **kw) -> ModelConfig:
    return ModelConfig(arch="mlp", latent_sizes=tuple(latents), hidden_sizes=tuple(hidden), **kw)


def _resnet(layers, channels, blocks, data_blocks, latent_channels, latent_stride, likelihood, **kw):
    return ModelConfig(arch="resnet", num_layers=layers, channels=channels, blocks=blocks,
                       data_blocks=data_blocks, latent_channels=latent_channels,
                       latent_stride=latent_stride, likelihood=likelihood, **kw)


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    description: str
    model: ModelConfig
    ou: OUConfig = field(default_factory=OUConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paper_params: float | None = None  # parameter count reported in the paper, if any
    method: str | None = None  # the method a preset is made for (lvae / biva models); None = any


_MNIST_TRAIN = TrainConfig(steps=100_000, batch_size=100, lr=1e-3)
_CIFAR_TRAIN = TrainConfig(steps=300_000, batch_size=64, lr=2e-3, optimizer="adamax", eval_every=5000,
                           eval_examples=1000, grad_clip=200.0)


def _cifar(layers, skip=False, params=None, desc=""):
    return Preset(
        name=f"cifar10-resnet-{layers}" + ("-skip" if skip else ""),
        dataset="cifar10",
        description=desc or f"CIFAR-10 ResNet HVAE, {layers} stochastic layers of 8x16x16" + (", skip connections (HVAE+)" if skip else ""),
        model=_resnet(layers, 100, 6, 16, 8, 1, "logistic", skip=skip),
        ou=OUConfig(rho=0.9, samples=5),
        train=_CIFAR_TRAIN,
        paper_params=params,
    )


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("mnist-mlp-40x4", "binarized-mnist",
           "static MNIST, 4 stochastic layers of 40 units, 2x200 tanh layers each (Tables 1, 4)",
           _mlp([40] * 4, [200] * 4), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-64-32-16-8", "mnist",
           "dynamic MNIST, latents 64-32-16-8, 2 layers of 512/256/128/64 units (Table 3)",
           _mlp([64, 32, 16, 8], [512, 256, 128, 64]), OUConfig(rho=0.95, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-40x4-dynamic", "mnist",
           "dynamic MNIST, 4 stochastic layers of 40 units, 2x200 tanh layers each",
           _mlp([40] * 4, [200] * 4), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-5", "mnist",
           "dynamic MNIST, latents 64-32-16-8-4, 2 layers of 512..32 units (Table 2)",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), OUConfig(rho=0.95, samples=5), _MNIST_TRAIN),
    Preset("mnist-resnet", "mnist",
           "dynamic MNIST ResNet: 4 stochastic layers of 8x7x7, 5 blocks of 64 maps at 14x14",
           _resnet(4, 64, 5, 5, 8, 2, "bernoulli"), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("omniglot-resnet", "omniglot",
           "OMNIGLOT ResNet: 4 stochastic layers of 8x7x7, 5 blocks of 64 maps at 14x14",
           _resnet(4, 64, 5, 5, 8, 2, "bernoulli"), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    _cifar(3, params=9.95e6),
    _cifar(4, params=12.4e6),
    _cifar(6, params=16.8e6),
    _cifar(3, skip=True, params=9.95e6, desc="CIFAR-10 HVAE+ (Table 5): 3 stochastic layers, skip connections"),
    # Baselines (issue 4): Ladder VAE and BIVA, tied to their method.
    Preset("cifar10-lvae-15", "cifar10", "CIFAR-10 Ladder VAE, 15 stochastic layers of 8x16x16, 10 blocks of 100 maps (Table 6)",
           _resnet(15, 100, 10, 16, 8, 1, "logistic"), OUConfig(), _CIFAR_TRAIN, paper_params=59.5e6, method="lvae"),
    Preset("cifar10-biva-15", "cifar10", "CIFAR-10 BIVA, 15 stochastic layers of 8x16x16 (BU+TD), 12 blocks of 100 maps (Table 6)",
           _resnet(15, 100, 12, 16, 8, 1, "logistic"), OUConfig(), _CIFAR_TRAIN, paper_params=103e6, method="biva"),
    Preset("mnist-mlp-lvae-5", "mnist", "dynamic MNIST Ladder VAE, latents 64-32-16-8-4, 2 layers of 512..32 units (Table 2)",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), OUConfig(), _MNIST_TRAIN, method="lvae"),
    Preset("mnist-mlp-biva-5", "mnist", "dynamic MNIST BIVA, latents 64-32-16-8-4 (BU+TD below the top), 2 layers of 512..32 units",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), OUConfig(), _MNIST_TRAIN, method="biva"),

]}

# Baselines (Tables 2, 5, 6): Ladder VAE and BIVA, tied to their method. The CIFAR-10 ones keep the
# HVAE presets' 100 maps and 16 data blocks and pick the blocks per net to land near the paper's
# counts: LVAE 58.26M (paper 59.5M, -2%), BIVA 103.02M (paper 103M, +0.0%).

# `hvae-fast train DATASET` with no preset trains that dataset's paper configuration.
DEFAULT_PRESET = {
    "binarized-mnist": "mnist-mlp-40x4",
    "mnist": "mnist-mlp-64-32-16-8",
    "omniglot": "omniglot-resnet",
    "cifar10": "cifar10-resnet-3-skip",
}


def preset_config(name: str, dataset: str | None = None) -> RunConfig:
    """A fresh RunConfig from preset ``name`` (deep-copied, so callers may mutate it)."""
    if name not in PRESETS:
        raise HVAEError(f"unknown preset {name!r}: `hvae-fast presets` lists them ({', '.join(PRESETS)})")
    p = PRESETS[name]
    import copy

    return RunConfig(dataset=dataset or p.dataset, preset=name, model=copy.deepcopy(p.model),
                     ou=copy.deepcopy(p.ou), train=copy.deepcopy(p.train), method=p.method or RunConfig.method)
