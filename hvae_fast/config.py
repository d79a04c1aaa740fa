"""Configs as dataclasses, and the preset registry named after the paper's experiments.

A run is fully described by a ``RunConfig`` (saved as ``config.json`` in the run directory). Presets
fill in the model and training settings of one experiment of the paper (see method.md,
"Configurations"); command-line flags override single fields.

Each field is declared once, with its default, help text, bounds and the methods it applies to in
its ``field(metadata=...)`` (see ``_f``): ``hvae-fast train``'s flags are generated from these
fields, and ``RunConfig.validate`` checks them, so a config from a file gets the same checks as one
from flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from .errors import HVAEError

METHODS = ("vae", "hvae", "iwae", "lvae", "biva", "ladder")
# MLP activations by name; nets.py maps each to its module (tests/test_model.py checks the two agree).
ACTIVATIONS = ("tanh", "relu", "elu", "gelu", "softplus")
PRECISIONS = ("fp32", "bf16", "fp16")
# Methods whose training smooths generator layers with the OU semigroup (lvae, biva: models/baselines.py;
# ladder, the VDVAE-style top-down ladder: models/ladder.py).
OU_METHODS = ("hvae", "lvae", "biva", "ladder")
ELBO_METHODS = ("vae", "hvae", "lvae", "biva", "ladder")  # methods trained on the ELBO's per-layer KL terms
# Characters W&B refuses in a project name (checked here, before a run starts, not by wandb.init later).
WANDB_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")


def _f(default, help: str = "", **meta):
    """A config field: its default, its ``--help`` text, and how the CLI treats it. Metadata keys:

    flag     the flag's name (default ``--<field-name>``), or False: not a flag (``why`` says why)
    lo, gt, hi   bounds: value >= lo, value > gt, value <= hi (each element of a tuple)
    length   exact length of a tuple
    methods  the methods the field applies to; passing its flag with another method is an error
    metavar  how ``--help`` names the value
    """
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelConfig:
    """Architecture of the stacked hierarchical VAE. Lists run bottom (z_1, next to x) to top (z_L)."""

    arch: str = _f("mlp", "network family")
    latent_sizes: tuple = _f((40, 40, 40, 40), "MLP: units per stochastic layer, bottom to top", lo=1, metavar="N,N,...")
    hidden_sizes: tuple = _f((200, 200, 200, 200), "MLP: width of the deterministic layers below each stochastic "
                             "layer, bottom to top", lo=1, metavar="N,N,...")
    hidden_layers: int = _f(2, "MLP: deterministic layers in each net (between stochastic layers, and next to x)", lo=1)
    activation: str = _f("tanh", "MLP nonlinearity")
    # ResNet latents have `latent_channels` maps at the feature resolution / `latent_stride`.
    num_layers: int = _f(4, "ResNet: stochastic layers", lo=1)
    channels: int = _f(100, "ResNet: feature maps of every net", lo=1)
    blocks: int = _f(6, "ResNet: blocks in each net between stochastic layers", lo=0)
    data_blocks: int = _f(16, "ResNet: blocks in the nets next to x, q(z_1|x) and p(x|z_1)", lo=0)
    latent_channels: int = _f(8, "ResNet: maps per stochastic layer", lo=1)
    latent_stride: int = _f(1, "ResNet: latents at the feature resolution / this", lo=1)
    latents_per_scale: tuple = _f((1, 2, 3), "ladder: stochastic layers at each resolution, the image's first, "
                                  "halving between entries; leading 0s start the ladder below the image's resolution "
                                  "(its depth is their sum; it reads --channels, --blocks per resolution in the "
                                  "encoder and --latent-channels, not --num-layers)",
                                  lo=0, methods=("ladder",), metavar="N,N,...")
    skip: bool = _f(False, "HVAE+: stochastic skip connections: each generator layer and p(x|z_1) also read the "
                    "latent samples of every layer above")
    likelihood: str = _f("bernoulli", flag=False, why="follows the dataset (bernoulli: binary images, "
                         "logistic: discretized logistic mixture)")
    n_mix: int = _f(10, "components of the discretized logistic mixture", lo=1)
    min_scale: float = _f(1e-3, "Gaussian layers: sigma = softplus(raw) + min_scale", gt=0)

    @property
    def depth(self) -> int:
        return len(self.latent_sizes) if self.arch == "mlp" else self.num_layers


@dataclass
class OUConfig:
    """OU smoothing of the intermediate generator layers p(z_i | z_{i+1}), training only (OU_METHODS)."""

    rho: float = _f(0.9, "OU correlation in [0, 1]; 1 = no smoothing (plain VAE gradients)", flag="--rho",
                    lo=0, hi=1, methods=OU_METHODS)
    samples: int = _f(5, "K, correlated samples per posterior sample", flag="--ou-samples", lo=1,
                      methods=OU_METHODS, metavar="K")
    target: str = _f("mean-std", "average the Gaussian head's mean and std, or mu/sigma", flag="--ou-target",
                     methods=OU_METHODS)
    backend: str = _f("auto", "OU kernels; auto picks the fastest available and logs it", flag="--backend",
                      methods=OU_METHODS)
    # The ladders' posteriors share their top-down pass, so only the stacked VAE has an inference network to smooth.
    smooth_inference: bool = _f(False, "also smooth the inference network (the paper: little benefit)",
                                flag="--ou-inference", methods=("hvae",))
    # HVAE memory close to the VAE's, for one extra forward of the smoothed layers.
    recompute: bool = _f(False, "recompute the K-sample generator activations in backward (less memory, more time)",
                         flag="--ou-recompute", methods=OU_METHODS)
    # A rho that changes during training (rho_control.py): a schedule, or a controller; not both.
    rho_schedule: str = _f("constant", "rho per step: constant (--rho), linear:START:END:STEPS or "
                           "cosine:START:END:STEPS, optionally :hold=STEPS (START for that many steps first)",
                           flag="--rho-schedule", methods=OU_METHODS, metavar="SPEC")
    rho_control: float = _f(0.0, "steer rho every step to keep the top layer's KL (a moving average over training "
                            "minibatches) near this many nats, raising rho towards 1 while it holds; starts at --rho; "
                            "0 disables", flag="--rho-control", lo=0, methods=OU_METHODS, metavar="TOP_KL_NATS")
    rho_min: float = _f(0.5, "--rho-control keeps rho at or above this", flag="--rho-min", lo=0, hi=1,
                        methods=OU_METHODS)


@dataclass
class TrainConfig:
    steps: int = _f(100_000, "optimizer steps", lo=1)
    batch_size: int = _f(100, "examples per step", lo=1)
    lr: float = _f(1e-3, "learning rate", gt=0)
    optimizer: str = _f("adam", "optimizer")
    lr_schedule: str = _f("cosine", "learning-rate schedule after warm-up")
    lr_decay: float = _f(0.1, "final lr = lr * lr_decay for cosine / exponential", gt=0, hi=1)
    warmup_steps: int = _f(0, "linear lr warm-up steps", lo=0)
    grad_clip: float = _f(200.0, "max global gradient norm; 0 disables", lo=0)
    seed: int = _f(0, "seed of the weights, data order and noise", lo=0, hi=2**63 - 1)
    kl_anneal: tuple = _f((0, 0), "KL weight 0 for ZERO_STEPS, then linear to 1 over RAMP_STEPS (0,0: weight 1 "
                          "throughout; reported ELBOs use weight 1)", lo=0, length=2, metavar="ZERO_STEPS,RAMP_STEPS")
    free_bits: float = _f(0.0, "per-layer floor: each stochastic layer's KL, averaged over the minibatch, is clamped "
                          "from below; 0 disables", lo=0, methods=ELBO_METHODS, metavar="NATS")
    iw_samples_train: int = _f(5, "IWAE's k (the paper's 5)", lo=1, methods=("iwae",), metavar="k")
    log_every: int = _f(50, "steps between train-metric records", lo=1)
    eval_every: int = _f(2000, "steps between validations", lo=1)
    eval_examples: int = _f(2000, "validation examples per periodic evaluation (0 = all)", lo=0)
    sample_every: int = _f(5000, "steps between sample grids", lo=1)
    checkpoint_every: int = _f(1000, "steps between checkpoints", lo=1)
    checkpoint_minutes: float = _f(10.0, "also checkpoint at least this often (minutes), so a slow run loses little",
                                   gt=0)
    precision: str = _f("fp32", "the nets' arithmetic in training: fp32, or bf16 / fp16 under torch.autocast (fp16 "
                        "with a GradScaler); likelihood, KL terms, latent samples and validation stay float32")
    compile: bool = _f(False, "run each training step (model forward, loss, backward) under torch.compile; the "
                       "first step compiles (minutes on CPU)")
    # Experiment trackers (training/tracking.py); TensorBoard needs no flag: RUN_DIR/tb when installed.
    wandb: str = _f("", "also log records, sample grids and the config to this Weights & Biases project (pip install "
                    "hvae-fast[wandb]); WANDB_MODE=offline keeps the run in RUN_DIR/wandb for `wandb sync`; "
                    "empty: off", metavar="PROJECT")
    wandb_group: str = _f("", "the W&B run group (a sweep groups its points under its name)", metavar="GROUP")


SECTIONS = {"model": ModelConfig, "ou": OUConfig, "train": TrainConfig}


def field_choices() -> dict:
    """{field name: allowed values} of the fields that take one of a few names."""
    from .ops.backends import BACKEND_NAMES, OU_TARGETS

    return {"method": METHODS, "arch": ("mlp", "resnet"), "activation": ACTIVATIONS,
            "likelihood": ("bernoulli", "logistic"), "target": OU_TARGETS, "backend": BACKEND_NAMES,
            "optimizer": ("adam", "adamax"), "precision": PRECISIONS, "lr_schedule": ("constant", "cosine", "exponential")}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (its name in error messages too)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def config_fields():
    """(section, field) for every field of a RunConfig; section None for RunConfig's own fields."""
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            yield from ((f.name, g) for g in dataclasses.fields(SECTIONS[f.name]))
        else:
            yield None, f


def field_kind(f: dataclasses.Field, optional: bool = False) -> str:
    """The type name of a field: "int", "float", "str", "bool", "tuple" (with " | None" if ``optional``
    and the field may be None)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind if optional else kind.removesuffix(" | None")


def _coerce(f: dataclasses.Field, v, where: str):
    """``v`` as the type of field ``f`` (a JSON list becomes a tuple, an int a float), else HVAEError."""
    if v is None and field_kind(f, optional=True).endswith(" | None"):
        return None
    kind = field_kind(f)
    ok = {"bool": lambda: isinstance(v, bool),
          "int": lambda: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda: isinstance(v, str),
          "tuple": lambda: isinstance(v, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)}
    if kind not in ok:
        return v
    if not ok[kind]():
        want = "a list of integers" if kind == "tuple" else {"bool": "true or false", "int": "an integer",
                                                            "float": "a number", "str": "a string"}[kind]
        raise HVAEError(f"{where}: {f.name} must be {want}, got {v!r}: fix it (or pass {flag_of(f)} on top)")
    if kind == "float" and isinstance(v, int) and abs(v) >= _INT_LIMIT:  # float() would overflow
        raise HVAEError(f"{where}: {f.name} is {_short(v)}, not a usable number: fix it (or pass {flag_of(f)} on top)")
    return tuple(v) if kind == "tuple" else float(v) if kind == "float" else v


# No count or size of this program reaches 2**63 (torch's index type): a larger integer is a typo.
_INT_LIMIT = 2**63


def _short(v: int) -> str:
    """A huge integer as a readable phrase (its digits could fill a screen)."""
    return f"an integer of {len(str(abs(v)))} digits" if abs(v) >= 10**20 else str(v)


def _check_bounds(f: dataclasses.Field, v) -> None:
    m = f.metadata
    for e in (v if isinstance(v, tuple) else (v,)):
        if not isinstance(e, (int, float)) or isinstance(e, bool):
            continue
        if isinstance(e, int) and abs(e) >= _INT_LIMIT:
            what = f"an entry of {flag_of(f)}" if isinstance(v, tuple) else flag_of(f)
            raise HVAEError(f"{what} is {_short(e)}, over 2**63: pass a value that fits in 64 bits "
                            f"(default {as_flag_value(f.default)})")
        bad = (isinstance(e, float) and not math.isfinite(e) or ("lo" in m and e < m["lo"])
               or ("gt" in m and e <= m["gt"]) or ("hi" in m and e > m["hi"]))
        if bad:
            want = " and ".join(f"{op} {m[k]}" for k, op in (("lo", ">="), ("gt", ">"), ("hi", "<=")) if k in m)
            what = f"each entry of {flag_of(f)}" if isinstance(v, tuple) else flag_of(f)
            raise HVAEError(f"{what} must be a finite number {want}, got {as_flag_value(v)}: pass a value {want} "
                            f"(default {as_flag_value(f.default)})")
    if "length" in m and len(v) != m["length"]:
        raise HVAEError(f"{flag_of(f)} takes {m['length']} values {m.get('metavar', '')}, got {as_flag_value(v)}: "
                        f"pass e.g. {flag_of(f)} {as_flag_value(f.default)}")


def as_flag_value(v) -> str:
    """A value as it is written on the command line: tuples as comma lists."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class RunConfig:
    dataset: str = _f("binarized-mnist", flag=False, why="the positional DATASET")
    preset: str = _f("mnist-mlp-40x4", flag=False, why="--preset picks a whole preset, it does not override a field")
    method: str = _f("hvae", "objective / model family")
    model: ModelConfig = field(default_factory=ModelConfig)
    ou: OUConfig = field(default_factory=OUConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        """A RunConfig from ``to_dict()``'s form; wrong types and unknown fields raise HVAEError.
        Missing fields take their defaults."""
        def build(dc, values, name):
            if not isinstance(values, dict):
                raise HVAEError(f"{where}: {name} must be a JSON object, got {values!r}: restore the run's config.json")
            fields = {f.name: f for f in dataclasses.fields(dc)}
            unknown = set(values) - set(fields)
            if unknown:
                raise HVAEError(f"{where}: unknown {dc.__name__} fields {sorted(unknown)}: was it written by "
                                f"another version? Remove them")
            return {k: v if k in SECTIONS and dc is cls else _coerce(fields[k], v, where) for k, v in values.items()}

        top = build(cls, d, "the config")
        for k, dc in SECTIONS.items():
            top[k] = dc(**build(dc, top.get(k, {}), f'"{k}"'))
        return cls(**top)

    def validate(self) -> "RunConfig":
        from .ops.backends import check_ou_args

        check_ou_args(self.ou.rho, self.ou.samples)
        choices = field_choices()
        for section, f in config_fields():
            v = getattr(getattr(self, section) if section else self, f.name)
            if f.name in choices and v not in choices[f.name]:
                raise HVAEError(f"unknown {flag_of(f)} {v!r}: choose one of {', '.join(choices[f.name])}")
            _check_bounds(f, v)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise HVAEError(f"unknown --device {self.device!r}: choose auto, cpu, cuda or cuda:N")
        t = self.train
        if self.method not in ELBO_METHODS and t.free_bits > 0:
            raise HVAEError(f"--free-bits acts on the ELBO's per-layer KL terms; --method {self.method} trains another "
                            f"objective: drop --free-bits or pick one of {', '.join(ELBO_METHODS)}")
        if self.method != "iwae" and t.iw_samples_train != TrainConfig.iw_samples_train:
            raise HVAEError(f"--iw-samples-train is IWAE's k; --method {self.method} does not use it: drop it or "
                            f"pass --method iwae")
        self._validate_rho_steering()
        bad = [c for c in WANDB_FORBIDDEN if c in t.wandb]
        if bad or len(t.wandb) > 128:
            why = f"it holds {' '.join(bad)}" if bad else "over 128 characters"
            raise HVAEError(f"--wandb {t.wandb!r} is not a W&B project name ({why}): pass a name of at most 128 "
                            f"characters without {' '.join(WANDB_FORBIDDEN)}")
        if t.wandb_group and not t.wandb:
            raise HVAEError("--wandb-group groups W&B runs; W&B logging is off: pass --wandb PROJECT too, or drop "
                            "--wandb-group")
        m = self.model
        if self.method == "ladder" and (m.arch != "resnet" or m.skip or m.latent_stride != 1):
            raise HVAEError(f"--method ladder is convolutional with its own layout (--latents-per-scale): it needs "
                            f"--arch resnet, --no-skip and --latent-stride 1, got {m.arch}, skip {m.skip}, latent "
                            f"stride {m.latent_stride}: pass those, or --preset mnist-vdvae-ladder-6 / "
                            f"cifar10-vdvae-ladder-6")
        if self.model.arch == "mlp" and len(self.model.latent_sizes) != len(self.model.hidden_sizes):
            raise HVAEError("--latent-sizes and --hidden-sizes need one entry per stochastic layer, got "
                            f"{as_flag_value(self.model.latent_sizes)} and {as_flag_value(self.model.hidden_sizes)}: pass both, "
                            "with as many entries each")
        return self

    def smooths(self) -> bool:
        """Whether training OU-smooths the generator layers: always for hvae (at rho = 1 too); for the
        ladders (lvae, biva, ladder) when rho < 1 or a schedule or controller steers it, so that at a constant
        rho = 1 (their presets' setting) they train as the plain baselines, without the K-sample pass."""
        from .training.rho_control import parse_schedule

        o = self.ou
        if self.method not in OU_METHODS:
            return False
        steered = parse_schedule(o.rho_schedule, o.rho).kind != "constant" or o.rho_control > 0
        return self.method == "hvae" or o.rho < 1 or steered

    def _validate_rho_steering(self) -> None:
        from .training.rho_control import parse_schedule

        o = self.ou
        scheduled, controlled = parse_schedule(o.rho_schedule, o.rho).kind != "constant", o.rho_control > 0
        if self.method not in OU_METHODS and (scheduled or controlled):
            raise HVAEError(f"--rho-schedule and --rho-control steer the OU smoothing of --method "
                            f"{'/'.join(OU_METHODS)}; --method {self.method} has none: drop them, or pass --method hvae")
        if self.method != "hvae" and o.smooth_inference:
            raise HVAEError(f"--ou-inference smooths the stacked VAE's inference network (--method hvae); --method "
                            f"{self.method} has none to smooth: drop --ou-inference")
        if scheduled and controlled:
            raise HVAEError("--rho-schedule and --rho-control both set rho during training: pass only one of them")
        if (scheduled or controlled) and self.train.compile:
            # The compiled step holds rho as a constant (a new rho would recompile every step) and the
            # controller reads the KL through a forward hook that the compiled graph does not run.
            raise HVAEError("--compile traces the step with a fixed rho; --rho-schedule / --rho-control change it "
                            "every step: drop --compile, or train with a constant rho")
        if controlled and o.smooth_inference:
            raise HVAEError("--rho-control reads the top layer's KL of the training forward, which --ou-inference "
                            "smooths: drop one of them")
        if controlled and o.rho < o.rho_min:
            raise HVAEError(f"--rho-control starts at --rho {o.rho}, below --rho-min {o.rho_min}: pass --rho at or "
                            f"above --rho-min")
        if not controlled and o.rho_min != OUConfig.rho_min:
            raise HVAEError(f"--rho-min bounds --rho-control only, which is off: pass --rho-control TOP_KL_NATS, or "
                            f"drop --rho-min")


def load_config(path) -> RunConfig:
    """Read and validate a run's ``config.json``; every problem is one HVAEError line."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HVAEError(f"{path} does not exist: pass the config.json of a `hvae-fast train` run") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HVAEError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}: pass a readable config.json") from None
    if not text.strip():
        raise HVAEError(f"{path} is empty (an interrupted write?): restore it, or pass --preset instead")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HVAEError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
                        f"restore it, or pass --preset instead") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep to parse
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise HVAEError(f"{path} is not a config ({why}): restore it, or pass --preset instead") from None
    cfg = RunConfig.from_dict(d, where=str(path))
    try:
        return cfg.validate()
    except HVAEError as exc:
        raise HVAEError(f"{path}: {exc} (or fix the file)") from None


# ----------------------------------------------------------------------------------------------
# Presets: one per experiment of the paper (method.md, "Configurations")
# ----------------------------------------------------------------------------------------------

def _mlp(latents, hidden, **kw) -> ModelConfig:
    return ModelConfig(arch="mlp", latent_sizes=tuple(latents), hidden_sizes=tuple(hidden), **kw)


def _resnet(layers, channels, blocks, data_blocks, latent_channels, latent_stride, likelihood, **kw):
    return ModelConfig(arch="resnet", num_layers=layers, channels=channels, blocks=blocks,
                       data_blocks=data_blocks, latent_channels=latent_channels,
                       latent_stride=latent_stride, likelihood=likelihood, **kw)


def _ladder(latents_per_scale, channels, blocks, latent_channels, likelihood):
    # num_layers is not read by the ladder; set to its depth so that config.json does not mislead.
    return ModelConfig(arch="resnet", latents_per_scale=tuple(latents_per_scale), num_layers=sum(latents_per_scale),
                       channels=channels, blocks=blocks, latent_channels=latent_channels, likelihood=likelihood)


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


# The paper's budgets: Figs. 1 and 3, 100k steps per model (the MNIST / OMNIGLOT presets' default);
# Tables 3 and 4, 1M steps (PAPER_STEPS; pass --steps 1000000 on the preset of the table).
PAPER_STEPS = {"fig1": 100_000, "fig3": 100_000, "table3": 1_000_000, "table4": 1_000_000}
_MNIST_TRAIN = TrainConfig(steps=PAPER_STEPS["fig1"], batch_size=100, lr=1e-3)
_CIFAR_TRAIN = TrainConfig(steps=300_000, batch_size=64, lr=2e-3, optimizer="adamax", eval_every=5000,
                           eval_examples=1000, grad_clip=200.0)


# The ladder presets train the paper's unsmoothed baselines; --rho below 1 smooths them (RunConfig.smooths).
_PLAIN = OUConfig(rho=1.0)
_LADDER_TRAIN = TrainConfig(steps=100_000, batch_size=32, lr=1e-3, warmup_steps=500)


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
           "static MNIST, 4 stochastic layers of 40 units, 2x200 tanh layers each (Tables 1, 4: --steps 1000000; Fig. 1)",
           _mlp([40] * 4, [200] * 4), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-64-32-16-8", "mnist",
           "dynamic MNIST, latents 64-32-16-8, 2 layers of 512/256/128/64 units (Table 3: --steps 1000000)",
           _mlp([64, 32, 16, 8], [512, 256, 128, 64]), OUConfig(rho=0.95, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-40x4-dynamic", "mnist",
           "dynamic MNIST, 4 stochastic layers of 40 units, 2x200 tanh layers each",
           _mlp([40] * 4, [200] * 4), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("mnist-mlp-5", "mnist",
           "dynamic MNIST, latents 64-32-16-8-4, 2 layers of 512..32 units (Table 2)",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), OUConfig(rho=0.95, samples=5), _MNIST_TRAIN),
    Preset("omniglot-mlp-40x4", "omniglot",
           "OMNIGLOT, 4 stochastic layers of 40 units, 2x200 tanh layers each (Fig. 1, left)",
           _mlp([40] * 4, [200] * 4), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("omniglot-mlp-200x3", "omniglot",
           "OMNIGLOT, 3 stochastic layers of 200 units, 2x200 tanh layers each (Fig. 1, middle)",
           _mlp([200] * 3, [200] * 3), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("mnist-resnet", "mnist",
           "dynamic MNIST ResNet: 4 stochastic layers of 8x7x7, 5 blocks of 64 maps at 14x14 (Fig. 1, right)",
           _resnet(4, 64, 5, 5, 8, 2, "bernoulli"), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    Preset("omniglot-resnet", "omniglot",
           "OMNIGLOT ResNet: 4 stochastic layers of 8x7x7, 5 blocks of 64 maps at 14x14",
           _resnet(4, 64, 5, 5, 8, 2, "bernoulli"), OUConfig(rho=0.9, samples=5), _MNIST_TRAIN),
    _cifar(3, params=9.95e6),
    _cifar(4, params=12.4e6),
    _cifar(6, params=16.8e6),
    _cifar(3, skip=True, params=9.95e6, desc="CIFAR-10 HVAE+ (Table 5): 3 stochastic layers, skip connections"),
    # Baselines (issue 4): Ladder VAE and BIVA, tied to their method.
    # LVAE and BIVA as the paper ran them (the BIVA authors' CIFAR-10 architecture, baselines.py):
    # 59,576,896 and 102,948,560 parameters, as the authors' code counts them (paper: 59.5M, 103M).
    Preset("cifar10-lvae-15", "cifar10", "CIFAR-10 Ladder VAE (BIVA authors' architecture): 15 stochastic layers, "
           "3 gated blocks of 96 maps each, latents 38..20x16x16, 18..12x8x8, 10x4x4 (Table 6)",
           _resnet(15, 96, 3, 3, 10, 1, "logistic"), _PLAIN, _CIFAR_TRAIN, paper_params=59.5e6, method="lvae"),
    Preset("cifar10-biva-15", "cifar10", "CIFAR-10 BIVA (authors' architecture): 15 stochastic layers (BU+TD below "
           "the top), 3 gated blocks of 96 maps per path, latents as cifar10-lvae-15 (Table 6)",
           _resnet(15, 96, 3, 3, 10, 1, "logistic"), _PLAIN, _CIFAR_TRAIN, paper_params=103e6, method="biva"),
    Preset("mnist-mlp-lvae-5", "mnist", "dynamic MNIST Ladder VAE, latents 64-32-16-8-4, 2 layers of 512..32 units (Table 2)",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), _PLAIN, _MNIST_TRAIN, method="lvae"),
    Preset("mnist-mlp-biva-5", "mnist", "dynamic MNIST BIVA, latents 64-32-16-8-4 (BU+TD below the top), 2 layers of 512..32 units",
           _mlp([64, 32, 16, 8, 4], [512, 256, 128, 64, 32]), _PLAIN, _MNIST_TRAIN, method="biva"),
    # The VDVAE-style ladder (issue 22, models/ladder.py), sized for a CPU: bottleneck blocks of 32 / 48
    # maps, the latents at half the image's resolution and below (the image enters and leaves by a
    # strided conv), and VDVAE's small batch.
    Preset("mnist-vdvae-ladder-6", "binarized-mnist", "static MNIST VDVAE-style top-down ladder: 6 latents, 3 of 4x14x14 "
           "and 3 of 4x7x7, bottleneck blocks of 32 maps (1 per resolution in the encoder)",
           _ladder((0, 3, 3), 32, 1, 4, "bernoulli"), _PLAIN, _LADDER_TRAIN, method="ladder"),
    Preset("cifar10-vdvae-ladder-6", "cifar10", "CIFAR-10 VDVAE-style top-down ladder: 6 latents, 2 each of 8x16x16, "
           "8x8x8 and 8x4x4, bottleneck blocks of 48 maps (1 per resolution in the encoder)",
           _ladder((0, 2, 2, 2), 48, 1, 8, "logistic"), _PLAIN, _LADDER_TRAIN, method="ladder"),

]}

# `hvae-fast train DATASET` with no preset trains that dataset's paper configuration.
DEFAULT_PRESET = {
    "binarized-mnist": "mnist-mlp-40x4",
    "mnist": "mnist-mlp-64-32-16-8",
    "omniglot": "omniglot-resnet",
    "cifar10": "cifar10-resnet-3-skip",
}

# ... and with --method ladder, that dataset's VDVAE-style ladder.
LADDER_PRESET = {"binarized-mnist": "mnist-vdvae-ladder-6", "mnist": "mnist-vdvae-ladder-6",
                 "cifar10": "cifar10-vdvae-ladder-6"}


def preset_config(name: str, dataset: str | None = None) -> RunConfig:
    """A fresh RunConfig from preset ``name`` (deep-copied, so callers may mutate it)."""
    if name not in PRESETS:
        raise HVAEError(f"unknown preset {name!r}: `hvae-fast presets` lists them ({', '.join(PRESETS)})")
    p = PRESETS[name]
    import copy

    return RunConfig(dataset=dataset or p.dataset, preset=name, model=copy.deepcopy(p.model),
                     ou=copy.deepcopy(p.ou), train=copy.deepcopy(p.train), method=p.method or RunConfig.method)
