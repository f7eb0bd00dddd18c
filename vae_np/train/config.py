"""What defines a training run: :class:`TrainConfig`, its checks, and what a resume may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..backend import BACKEND_NAMES, DTYPE_NAMES, get_backend
from ..data import BINARIZE_MODES
from ..layers import ACTIVATIONS
from ..likelihoods import make_likelihood
from ..networks import ARCHITECTURES, CONV_CHANNELS, DEFAULT_HIDDEN
from ..objectives import OBJECTIVES
from ..validation import check_bool, check_choice, check_int, check_number

__all__ = ["OUTPUT_BIASES", "PRESETS", "SCHEDULES", "TrainConfig", "check_choice", "check_int",
           "preset", "stage_epochs"]


#: Initialisations of the decoder's output bias: ``zero`` (every Linear's own), or
#: ``data-logit``: the logit of the training set's mean pixel, clipped to [1e-3, 1 - 1e-3]
#: (Burda et al.'s code; Bernoulli decoder only).
OUTPUT_BIASES = ("zero", "data-logit")

#: Learning-rate schedules: ``constant`` (``lr`` throughout) and ``burda2015``: stage
#: i = 0..7 runs 3^i epochs at ``lr`` * 10^(-i/7) (Burda, Grosse & Salakhutdinov 2015).
SCHEDULES = ("constant", "burda2015")
BURDA2015_STAGES = 8


def stage_epochs(stages: int) -> int:
    """Epochs in the first ``stages`` stages of the burda2015 schedule: (3^N - 1) / 2
    (1, 4, 13, 40, 121, 364, 1093, 3280)."""
    check_int("stages", stages, 1)
    if stages > BURDA2015_STAGES:
        raise ValueError(f"stages: the burda2015 schedule has {BURDA2015_STAGES} stages, "
                         f"got {stages}")
    return (3 ** stages - 1) // 2


def schedule_stage(epoch: int) -> int:
    """The burda2015 stage (0-based) that epoch ``epoch`` (1-based) belongs to."""
    stage = 0
    while stage_epochs(stage + 1) < epoch:
        stage += 1
    return stage


#: ``--preset`` values: the TrainConfig fields each preset sets (flags typed beside it
#: win). ``burda2015``: the one-stochastic-layer MNIST setup of Burda et al. (2015) as its
#: authors' code runs it; it leaves the objective and k (``objective``, ``samples``) alone.
PRESETS: dict[str, dict[str, Any]] = {
    "burda2015": {
        "hidden": (200, 200), "latent_dim": 50, "decoder": "bernoulli",
        "activation": "tanh", "output_bias": "data-logit",
        # The authors' code feeds the binary pixels as they are; centring them (the
        # library's default 0.5) costs about one nat of test ln p(x) at the same epochs.
        "input_shift": 0.0,
        "batch_size": 20, "lr": 1e-3, "adam_eps": 1e-4, "binarize": "dynamic",
        "schedule": "burda2015", "epochs": stage_epochs(BURDA2015_STAGES),
        "eval_samples": 5000,
    },
}


def preset(name: str) -> dict[str, Any]:
    """The TrainConfig fields preset ``name`` sets (a copy)."""
    check_choice("preset", name, tuple(PRESETS))
    return dict(PRESETS[name])


@dataclass
class TrainConfig:
    """Everything that defines a training run; JSON-able (``to_dict`` / ``from_dict``).

    The defaults are the starting configuration (784-512-512-64 encoder, Adam with
    lr 1e-3, batch 32, 10 epochs) with the Bernoulli decoder.

    Model (passed to :class:`vae_np.VAE`, which checks them):
        architecture: ``mlp`` (default) or ``conv``, the starting example's convolutional
            encoder and decoder (``VAE(architecture="conv")``), on the data set's
            ``image_shape``.
        hidden: encoder dense widths; the decoder mirrors them (None: the
            architecture's, (512, 512) for the MLP, (512,) for conv).
        channels: conv only: the two convolutions' widths (None: (32, 64)).
        latent_dim: d. decoder: ``bernoulli``, ``gaussian`` or ``gaussian-fixed``.
        variance: lambda of ``gaussian-fixed`` (None: the VAE's default).
        samples: S, reparameterised samples per image in the training loss.
        beta: weight of the KL term (1: the ELBO).
    Optimisation:
        lr, clip_norm: Adam's step size; clip the gradient's global L2 norm (None: off).
        batch_size, epochs.
    Data:
        binarize: ``none`` (grey levels are the targets), ``static`` (one fixed random
            binarization), ``dynamic`` (a fresh one each epoch: the standard for
            likelihood numbers comparable with published ones) or ``auto``: dynamic for
            the Bernoulli decoder, none for the Gaussian ones. ``static`` and ``dynamic``
            need the Bernoulli decoder: a Gaussian density on 0/1 pixels is no likelihood
            of binary data (with a learned variance it grows without bound), so that
            combination is refused.
        limit_train, limit_test: keep only this many images (a seeded random choice),
            for quick runs; None keeps all.
    Run:
        backend: ``numpy``, ``cupy``, ``auto`` (or ``array_api_strict``, for tests).
        dtype: ``float32`` or ``float64``. seed: the root of every random stream.
    Evaluation and logging:
        eval_samples: K of the final importance-sampled test ln p(x) (0: skip it). The
            papers use 5000; 1000 is within a nat of it for the default model
            (docs/results.md), at a fifth of the time.
        eval_batch_size: test images per evaluation batch.
        log_every: read the losses back from the device (progress bar, NaN check)
            every this many batches.
    Objective, architecture and optimiser details (their defaults keep the runs made
    before they existed):
        objective: ``vae`` (the negative ELBO with the closed-form KL, S samples averaged)
            or ``iwae`` (the negative importance-weighted bound of Burda et al. 2015 with
            k = ``samples``; beta must stay 1).
        activation: the hidden units (``vae_np.layers.ACTIVATIONS``); ``tanh`` gets Glorot
            initialisation, ReLU-like ones He.
        adam_eps: Adam's epsilon.
        output_bias: ``zero`` or ``data-logit`` (see ``OUTPUT_BIASES``).
        input_shift: subtracted from the pixels before the encoder (the VAE's
            ``input_shift``): 0.5 centres [0, 1] pixels, 0 feeds them as they are (as
            Burda et al.'s code does).
        schedule: ``constant`` or ``burda2015`` (see ``SCHEDULES``; ``epochs`` at most
            3,280 then); the trainer sets the learning rate at the start of each epoch.
        conditional: a conditional VAE, q(z | x, y) and p(x | z, y), on the data set's
            labels (which it then needs).
    Data parallelism:
        distributed: train under ``mpiexec -n N`` (:mod:`vae_np.distributed`): each rank
            trains on its shard of every global batch of ``batch_size`` images (which must
            divide by N), the gradients are summed with one allreduce, and every rank takes
            the same Adam step; only rank 0 writes. Needs mpi4py (the ``mpi`` extra).
    """

    hidden: tuple[int, ...] | None = None
    latent_dim: int = 64
    decoder: str = "bernoulli"
    variance: float | None = None
    samples: int = 1
    beta: float = 1.0
    lr: float = 1e-3
    clip_norm: float | None = None
    batch_size: int = 32
    epochs: int = 10
    binarize: str = "auto"
    limit_train: int | None = None
    limit_test: int | None = None
    backend: str = "numpy"
    dtype: str = "float32"
    seed: int = 0
    eval_samples: int = 1000
    eval_batch_size: int = 500
    log_every: int = 25
    distributed: bool = False
    objective: str = "vae"
    activation: str = "relu"
    adam_eps: float = 1e-8
    output_bias: str = "zero"
    schedule: str = "constant"
    conditional: bool = False
    input_shift: float = 0.5
    architecture: str = "mlp"
    channels: tuple[int, ...] | None = None

    #: Fields a resumed run may change; every other field defines the run. (A resumed
    #: run must still have the number of ranks the checkpoint records.)
    CONTINUATION_FIELDS = ("epochs", "eval_samples", "eval_batch_size", "log_every",
                           "distributed")

    def __post_init__(self):
        check_choice("architecture", self.architecture, ARCHITECTURES)
        if self.hidden is None:
            self.hidden = DEFAULT_HIDDEN[self.architecture]
        if self.channels is None and self.architecture == "conv":
            self.channels = CONV_CHANNELS       # resolved, as hidden: what the model gets
        if self.channels is not None:
            if self.architecture != "conv":
                raise ValueError(f"channels: the convolution widths are for "
                                 f"architecture='conv', got {self.channels!r} with "
                                 f"{self.architecture!r}")
            if isinstance(self.channels, (str, bytes)) or not isinstance(self.channels,
                                                                         Sequence):
                raise TypeError(f"channels: expected two widths, got {self.channels!r}")
            self.channels = tuple(self.channels)
            if len(self.channels) != 2:
                raise ValueError(f"channels: expected the two convolutions' widths, got "
                                 f"{len(self.channels)}: {self.channels!r}")
            for width in self.channels:
                check_int("channels", width, 1)
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence):
            raise TypeError(f"hidden: expected a sequence of layer widths, got {self.hidden!r}")
        self.hidden = tuple(self.hidden)
        # Stored as Python int / float (NumPy scalars accepted), so to_dict is JSON-able;
        # a checkpoint's values pass here too, so a tampered one names the file.
        for name in ("latent_dim", "samples", "batch_size", "epochs", "eval_batch_size",
                     "log_every"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        self.seed = check_int("seed", self.seed, 0)
        self.eval_samples = check_int("eval_samples", self.eval_samples, 0)
        self.hidden = tuple(check_int("hidden", width, 1) for width in self.hidden)
        self.lr = check_number("lr", self.lr, low=0.0, low_open=True)
        self.beta = check_number("beta", self.beta, low=0.0)
        self.input_shift = check_number("input_shift", self.input_shift)
        if self.clip_norm is not None:
            self.clip_norm = check_number("clip_norm", self.clip_norm, low=0.0, low_open=True)
        for name in ("distributed", "conditional"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        self.limit_train = check_int("limit_train", self.limit_train, 1, allow_none=True)
        self.limit_test = check_int("limit_test", self.limit_test, 1, allow_none=True)
        check_choice("binarize", self.binarize, ("auto", *BINARIZE_MODES))
        check_choice("backend", self.backend, BACKEND_NAMES + ("array_api_strict",))
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        make_likelihood(self.decoder, self.variance)  # checks decoder and variance now
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("activation", self.activation, tuple(sorted(ACTIVATIONS)))
        check_choice("output_bias", self.output_bias, OUTPUT_BIASES)
        check_choice("schedule", self.schedule, SCHEDULES)
        self.adam_eps = check_number("adam_eps", self.adam_eps, low=0.0, low_open=True)
        if self.objective == "iwae" and self.beta != 1:
            raise ValueError(
                f"beta: the iwae objective has no KL term to weight, so beta must stay 1 "
                f"(got beta={self.beta!r} with objective='iwae'); --beta is for "
                f"--objective vae")
        if self.architecture == "conv" and self.activation != "relu":
            raise ValueError(f"activation: the conv architecture has ReLU units (the "
                             f"starting example's), got {self.activation!r}")
        if self.output_bias == "data-logit" and self.architecture != "mlp":
            raise ValueError(f"output_bias='data-logit' sets one logit per pixel, and the "
                             f"{self.architecture!r} decoder's last bias is one per channel; "
                             f"it needs architecture='mlp'")
        if self.output_bias == "data-logit" and self.decoder != "bernoulli":
            raise ValueError(f"output_bias='data-logit' sets the decoder's Bernoulli logits "
                             f"to the data's; it needs decoder='bernoulli', got "
                             f"{self.decoder!r}")
        if self.schedule == "burda2015" and self.epochs > stage_epochs(BURDA2015_STAGES):
            raise ValueError(f"epochs: the burda2015 schedule ends after its "
                             f"{BURDA2015_STAGES} stages, {stage_epochs(BURDA2015_STAGES):,} "
                             f"epochs; got {self.epochs}")
        if self.decoder != "bernoulli" and self.binarize in ("static", "dynamic"):
            raise ValueError(
                f"binarize={self.binarize!r} with decoder={self.decoder!r}: a Gaussian density "
                f"on 0/1 pixels is no likelihood of binary data (with a learned variance it "
                f"grows without bound); use binarize='none' (--binarize none) or "
                f"decoder='bernoulli' (--decoder bernoulli)")

    @property
    def binarize_mode(self) -> str:
        """``binarize`` with ``auto`` resolved for the decoder."""
        if self.binarize != "auto":
            return self.binarize
        return "dynamic" if self.decoder == "bernoulli" else "none"

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`vae_np.VAE` this config sets (a conditional
        model's ``num_classes`` comes from the data set)."""
        return {"hidden": self.hidden, "latent_dim": self.latent_dim, "decoder": self.decoder,
                "variance": self.variance, "beta": self.beta, "samples": self.samples,
                "seed": self.seed, "activation": self.activation,
                "objective": self.objective, "input_shift": self.input_shift,
                **({"architecture": "conv", "channels": self.channels}
                   if self.architecture == "conv" else {})}

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (1-based): ``lr``, or for the burda2015
        schedule ``lr`` * 10^(-i/7) in stage i."""
        check_int("epoch", epoch, 1)
        if self.schedule == "constant":
            return self.lr
        return self.lr * 10.0 ** (-schedule_stage(epoch) / 7.0)

    @property
    def loss_name(self) -> str:
        """What the reported loss is: ``-ELBO``, or ``-IWAE k=5 bound``."""
        if self.objective == "iwae":
            return f"-IWAE k={self.samples} bound"
        return "-ELBO"

    def objective_summary(self) -> dict[str, Any]:
        """What the reported losses are, for results.json: ``{"name", "samples", "loss",
        "conditional"}`` (``samples``: S of the ELBO, k of the IWAE bound)."""
        return {"name": self.objective, "samples": self.samples, "loss": self.loss_name,
                "conditional": self.conditional}

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden"] = list(self.hidden)
        if self.channels is not None:
            values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"values: unknown TrainConfig fields {unknown}")
        return cls(**values)

    def continued(self, overrides: Mapping[str, Any], out_dir: str | Path) -> "TrainConfig":
        """This (saved) config with ``overrides`` for a resumed run in ``out_dir``.

        Overrides equal to the saved value are fine whatever the field (``backend``:
        compared by what ``auto`` resolves to here); a different value only for
        ``CONTINUATION_FIELDS``, else ValueError naming the field.
        """
        changes = {}
        for name, value in dict(overrides).items():
            if name not in self.to_dict():
                raise ValueError(f"overrides: unknown TrainConfig field {name!r}")
            if name == "backend":  # compare what "auto" resolves to here
                value = get_backend(value, self.dtype).name
            if isinstance(value, list):
                value = tuple(value)
            if value == getattr(self, name):
                continue
            if name not in self.CONTINUATION_FIELDS:
                raise ValueError(
                    f"{name}: the run in {out_dir} was trained with {name}={getattr(self, name)!r}"
                    f" and cannot continue with {value!r} (a resumed run may change only "
                    f"{', '.join(self.CONTINUATION_FIELDS)}); use a new out_dir instead")
            changes[name] = value
        return dataclasses.replace(self, **changes)
