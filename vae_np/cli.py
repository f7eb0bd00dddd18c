"""``vae-np``: train a VAE, and use a trained one (``python -m vae_np`` is the same).

    vae-np train [flags]                                     what examples/train_mnist.py does
    vae-np sample CHECKPOINT --n 64 --out samples.png [--seed S] [--npy] [--label 3]
    vae-np reconstruct CHECKPOINT --dataset DATA --out recon.png
    vae-np encode CHECKPOINT --dataset DATA --out codes.npz   mu and logvar per example
    vae-np interpolate CHECKPOINT --dataset DATA --pairs 8 --steps 10 --out interp.png [--spherical]
    vae-np traverse CHECKPOINT [--dataset DATA] --out traverse.png   one row per latent dimension
    vae-np eval CHECKPOINT --dataset DATA -K 5000             test -ELBO, ln p(x), active units
    vae-np export CHECKPOINT --format onnx|safetensors|torch --out PATH   (vae_np.cli_interop)
    vae-np import STATE_DICT --out model.npz                 a PyTorch / safetensors model

CHECKPOINT is a trainer checkpoint (``results/checkpoint.npz``) or a model-only export
(:func:`vae_np.save_model`). DATA is ``mnist`` (the default), a ``.npz`` file or a folder
of images (:func:`vae_np.data.load_dataset`). Every subcommand runs on any backend
(``--backend``). Exit status: 0 done, 1 an unusable checkpoint, data set or backend (one
line on stderr, no traceback), 2 a bad flag, 130 Ctrl-C. No output may be (or resolve
to) an input, and its suffix names the format written (:mod:`vae_np.outputs`); data
flags not given are taken from the checkpoint's record of the run's data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import plotting
from .backend import BackendUnavailableError
from .checkpoint import CheckpointError, atomic_write
from .data import Dataset, binarize, load_dataset
from .cli_args import (DATA_SOURCE_FLAGS, LOSS_SCALING, OneLineErrorParser, add_data_flags,
                       add_model_flags, at_least_two, nonnegative_int, positive_float,
                       positive_int, take_recorded_data, typed_flags)
from .cli_interop import add_interop_commands
from .outputs import PICTURE_FORMATS, check_output
from .saving import SavedModel, read_model
from .validation import check_fits_in_memory

__all__ = ["LOSS_SCALING", "build_parser", "main"]

PROG = "vae-np"


class CLIError(Exception):
    """A problem to report on one line, exit status 1."""


# --------------------------------------------------------------------------------------
# What the subcommands share: the model, the data, pictures of either kind


def load(args) -> SavedModel:
    """The model, and the data-source flags not typed: the run's own data (as recorded in
    the checkpoint), else the defaults."""
    saved = read_model(args.checkpoint, backend=args.backend, dtype=args.dtype)
    if getattr(args, "dataset", None) is not None:  # traverse's None: no data set
        take_recorded_data(args, args.data_given, saved.data)  # typed flags: main()
    return saved


PICTURES = tuple(PICTURE_FORMATS)  # what a picture's --out may end in


def output(args, path, suffixes=PICTURES, flag: str = "--out") -> Path:
    """An output of this command, checked before any work against what it reads (the
    checkpoint, the data set) and for its suffix (:func:`vae_np.outputs.check_output`)."""
    return check_output(flag, path, suffixes=suffixes,
                        inputs=(("checkpoint", args.checkpoint),
                                ("data set", getattr(args, "dataset", None))))


def load_examples(args, saved: SavedModel) -> tuple[np.ndarray, np.ndarray | None, Dataset]:
    """The chosen split of ``--dataset`` as host arrays (x (N, D) float32, y (N,) or None),
    checked against the model: the feature count, labels for a conditional model."""
    model = saved.model
    ds = load_dataset(args.dataset, decoder=model.config["decoder"], data_dir=args.data_dir,
                      download=not args.no_download, color=args.color,
                      image_size=args.image_size, test_fraction=args.test_fraction,
                      seed=args.split_seed, log=lambda message: print(message, file=sys.stderr))
    if ds.n_features != model.input_dim:
        raise CLIError(f"dataset: {ds.description} has {ds.n_features} features per example; "
                       f"the model in {saved.path} takes {model.input_dim}")
    difference = ds.differs_from(saved.data, args.split)
    if difference is not None:
        print(f"note: these are not the data the model in {saved.path} was trained on: "
              f"{difference}", file=sys.stderr)
    x = ds.x_train if args.split == "train" else ds.x_test
    y = ds.y_train if args.split == "train" else ds.y_test
    if args.limit is not None:
        x, y = x[:args.limit], None if y is None else y[:args.limit]
    num_classes = model.config.get("num_classes")
    if num_classes:
        if y is None:
            raise CLIError(f"dataset: the model in {saved.path} is conditional on "
                           f"{num_classes} classes and needs labels; {ds.source} has none")
        if int(y.max()) >= num_classes:
            raise CLIError(f"dataset: label {int(y.max())} in {ds.source}; the model in "
                           f"{saved.path} knows classes 0..{num_classes - 1}")
    return x, y, ds


def class_args(model, y) -> dict:
    """The label keyword of a conditional model's methods (empty for an unconditional one)."""
    return {"y": y} if model.config.get("num_classes") else {}


def host(model, array) -> np.ndarray:
    return np.asarray(model.backend.to_numpy(array))


def as_pictures(values: np.ndarray) -> np.ndarray:
    """Decoder means as pictures: Gaussian means may stray outside [0, 1]."""
    return np.clip(values, 0.0, 1.0)


def draw_grid(path: Path, saved: SavedModel, images: np.ndarray, nrow: int, title: str,
              panel_titles=None) -> Path:
    """An image grid for image data, else line plots of (at most 16) feature vectors."""
    if saved.image_shape is not None:
        return plotting.save_image_grid(path, as_pictures(images), nrow=nrow, title=title,
                                        image_shape=saved.image_shape)
    shown = images[:16]
    return plotting.plot_feature_vectors(
        path, [row[None, :] for row in shown], ncol=4,
        title=f"{title} (first {len(shown)} of {len(images)})" if len(images) > 16 else title,
        panel_titles=None if panel_titles is None else list(panel_titles)[:16])


def write_npz(path: Path, **arrays) -> Path:
    """``numpy.savez`` written atomically (a reader never sees half a file)."""
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def say(message: str) -> None:
    print(message)


def _labels_to_draw(model, args, n: int) -> tuple[np.ndarray | None, int]:
    """Labels for sampling a conditional model: ``--label`` for all n, else a row of
    ceil(n / classes) per class. Returns (labels or None, images per row)."""
    num_classes = model.config.get("num_classes")
    nrow = 8 if args.nrow is None else args.nrow
    if not num_classes:
        if args.label is not None:
            raise CLIError(f"--label: the model in {args.checkpoint} is not conditional "
                           f"(trained without --conditional)")
        return None, nrow
    if args.label is not None:
        if args.label >= num_classes:
            raise CLIError(f"--label: expected a class in 0..{num_classes - 1}, got {args.label}")
        return np.full(n, args.label, dtype=np.int64), nrow
    if args.nrow is not None:
        raise CLIError(f"--nrow: the model in {args.checkpoint} is conditional: without "
                       f"--label it draws one row per class ({num_classes} rows of "
                       f"ceil(n / {num_classes})); give --label to lay out one class in rows "
                       f"of --nrow")
    per_class = math.ceil(n / num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class), per_class


# --------------------------------------------------------------------------------------
# Subcommands


def cmd_sample(args) -> int:
    saved = load(args)
    out = output(args, args.out, PICTURES + (".npy",))
    npy = out if out.suffix.lower() == ".npy" else out.with_suffix(".npy")
    if args.npy:
        output(args, npy, (".npy",), "--npy")
    model = saved.model
    labels, nrow = _labels_to_draw(model, args, args.n)
    n = args.n if labels is None else len(labels)
    # z, the decoder's activations and its output, on the device and then the host
    check_fits_in_memory("--n", n * (model.latent_dim + sum(model.hidden)
                                     + 3 * model.input_dim), model.backend.numpy_dtype.itemsize)
    rng = model.backend.rng(args.seed)
    images = host(model, model.sample(n, rng, **({} if labels is None else {"y": labels})))
    if out.suffix.lower() == ".npy" or args.npy:
        atomic_write(npy, lambda fh: np.save(fh, images))
        say(f"wrote {npy} ({n} decoder means, shape {images.shape})")
    if out.suffix.lower() != ".npy":
        what = "per class" if labels is not None and args.label is None else ""
        title = "samples" + (", a row per class" if what else "") + \
            (f", class {args.label}" if args.label is not None else "")
        draw_grid(out, saved, images, nrow, title)
        say(f"wrote {out}")
    return 0


def cmd_reconstruct(args) -> int:
    saved = load(args)
    out = output(args, args.out)
    model = saved.model
    x, y, ds = load_examples(args, saved)
    x, y = x[:args.n], None if y is None else y[:args.n]
    recon = host(model, model.reconstruct(x, **class_args(model, y)))
    title = f"{args.split} examples and reconstructions"
    if saved.image_shape is not None:
        plotting.save_reconstructions(out, as_pictures(x), as_pictures(recon), n=args.n,
                                      ncol=8, title=title, image_shape=saved.image_shape)
    else:
        shown = min(len(x), 16)
        plotting.plot_feature_vectors(out, [np.stack([x[i], recon[i]]) for i in range(shown)],
                                      ncol=4, title=title,
                                      legend=("original", "reconstruction"))
    say(f"wrote {out}")
    return 0


def cmd_encode(args) -> int:
    saved = load(args)
    out = output(args, args.out, (".npz",))
    model = saved.model
    x, y, _ = load_examples(args, saved)
    mus, logvars = [], []
    for start in range(0, len(x), args.batch_size):
        batch = slice(start, start + args.batch_size)
        mu, logvar = model.encode(x[batch], **class_args(model, None if y is None else y[batch]))
        mus.append(host(model, mu))
        logvars.append(host(model, logvar))
    arrays = {"mu": np.concatenate(mus), "logvar": np.concatenate(logvars)}
    if y is not None:
        arrays["y"] = y
    write_npz(out, **arrays)
    say(f"wrote {out}: mu and logvar, ({len(x)}, {model.latent_dim}) each"
        + (", and the labels y" if y is not None else ""))
    return 0


def interpolate_latents(a: np.ndarray, b: np.ndarray, steps: int, spherical: bool) -> np.ndarray:
    """``steps`` points from a to b (both (d,)), both ends included: (steps, d).

    Linear: (1 - t) a + t b. Spherical (slerp): along the great circle, with the norm
    interpolated too, sin((1-t) w)/sin w a + sin(t w)/sin w b, w the angle between a and
    b; it falls back to linear when a and b are (anti)parallel within 1e-6 rad or zero.
    Under the N(0, I) prior, points on the straight line between two typical codes are
    atypically close to the origin in high dimension; slerp keeps their norm typical.
    """
    t = np.linspace(0.0, 1.0, steps)[:, None]
    linear = (1 - t) * a + t * b
    if not spherical:
        return linear
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return linear
    omega = math.acos(float(np.clip(np.dot(a, b) / norms, -1.0, 1.0)))
    if omega < 1e-6 or math.pi - omega < 1e-6:
        return linear
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)


def cmd_interpolate(args) -> int:
    saved = load(args)
    out = output(args, args.out)
    if args.npy:
        output(args, out.with_suffix(".npy"), (".npy",), "--npy")
    model = saved.model
    x, y, ds = load_examples(args, saved)
    if len(x) < 2:
        raise CLIError(f"dataset: interpolation needs two examples, the {args.split} split "
                       f"of {ds.source} has {len(x)}")
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(x), size=2 * args.pairs, replace=2 * args.pairs > len(x))
    ends = x[pick]
    labels = None if y is None else y[pick]
    mu = host(model, model.encode(ends, **class_args(model, labels))[0]).astype(np.float64)
    rows, row_labels = [], []
    for p in range(args.pairs):
        path = interpolate_latents(mu[2 * p], mu[2 * p + 1], args.steps, args.spherical)
        # A conditional model decodes the first end's class along the whole path.
        lab = None if labels is None else np.full(args.steps, labels[2 * p])
        decoded = host(model, model.decode(path, **class_args(model, lab)))
        rows.append(np.concatenate([ends[2 * p][None], decoded, ends[2 * p + 1][None]]))
        row_labels.append(f"pair {p}")
    kind = "spherical" if args.spherical else "linear"
    title = f"{kind} interpolation"  # short: the picture may be narrow
    if saved.image_shape is not None:
        plotting.save_image_grid(out, as_pictures(np.concatenate(rows)), nrow=args.steps + 2,
                                 title=title, image_shape=saved.image_shape)
    else:
        plotting.plot_feature_vectors(out, [r[1:-1] for r in rows[:16]], ncol=4,
                                      title=f"{kind} interpolation, decoded steps (dark: "
                                            f"first end, light: second)",
                                      panel_titles=row_labels[:16])
    if args.npy:
        npy = out.with_suffix(".npy")
        atomic_write(npy, lambda fh: np.save(fh, np.stack([r[1:-1] for r in rows])))
        say(f"wrote {npy} (pairs, steps, features)")
    say(f"wrote {out}")
    return 0


def cmd_traverse(args) -> int:
    saved = load(args)
    out = output(args, args.out)
    model = saved.model
    d = model.latent_dim
    base = np.zeros(d)
    order = np.arange(d)
    label = args.label
    where = "z = 0"
    if args.dataset is None and args.index is not None:
        raise CLIError("--index picks an example of --dataset as the base point; give "
                       "--dataset (without it the traversal is around z = 0)")
    num_classes = model.config.get("num_classes")
    if label is not None and num_classes and label >= num_classes:
        raise CLIError(f"--label: expected a class in 0..{num_classes - 1}, got {label}")
    args.index = args.index or 0
    if args.dataset is not None:
        x, y, ds = load_examples(args, saved)
        if args.index >= len(x):
            raise CLIError(f"--index: the {args.split} split of {ds.source} has {len(x)} "
                           f"examples, got {args.index}")
        mu, logvar = (host(model, a).astype(np.float64)
                      for a in model.encode(x[:args.batch_size],
                                            **class_args(model, None if y is None
                                                         else y[:args.batch_size])))
        # Rank dimensions by their mean KL to the prior: the ones the model uses first.
        kl = 0.5 * np.mean(mu ** 2 + np.exp(logvar) - logvar - 1.0, axis=0)
        order = np.argsort(-kl, kind="stable")
        base = mu[args.index] if args.index < len(mu) else host(
            model, model.encode(x[args.index:args.index + 1], **class_args(
                model, None if y is None else y[args.index:args.index + 1]))[0])[0]
        where = f"the posterior mean of {args.split} example {args.index}"
        if y is not None and label is None:
            label = int(y[args.index])
    dims = order[:min(args.max_dims, d)]
    values = np.linspace(-args.range, args.range, args.steps)
    points = np.repeat(base[None, :], len(dims) * args.steps, axis=0)
    for row, dim in enumerate(dims):
        points[row * args.steps:(row + 1) * args.steps, dim] = base[dim] + values
    largest = float(np.finfo(model.backend.numpy_dtype).max)
    if not np.all(np.abs(points) <= largest):
        raise CLIError(f"--range: {args.range:g} takes z beyond {largest:.3g}, the largest "
                       f"{model.backend.dtype_name} number; use a smaller range (the prior's "
                       f"standard deviation is 1)")
    extra = {}
    if model.config.get("num_classes"):
        if label is None:
            label = 0
        extra = {"y": np.full(len(points), label, dtype=np.int64)}
    elif args.label is not None:
        raise CLIError(f"--label: the model in {args.checkpoint} is not conditional")
    decoded = host(model, model.decode(points, **extra))
    title = (f"traversal of z[{', '.join(map(str, dims[:8]))}{', ...' if len(dims) > 8 else ''}]"
             f", {-args.range:g}..{args.range:g} around {where}")
    if saved.image_shape is not None:
        plotting.save_image_grid(out, as_pictures(decoded), nrow=args.steps, title=title,
                                 image_shape=saved.image_shape)
    else:
        plotting.plot_feature_vectors(
            out, [decoded[r * args.steps:(r + 1) * args.steps] for r in range(len(dims))],
            ncol=4, title=title, panel_titles=[f"z[{k}]" for k in dims])
    say(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from .train.active_units import active_units, active_units_line  # here: only eval
    from .train.evaluation import log_likelihood_summary  # here: only eval needs the trainer's

    saved = load(args)
    if args.json:  # before the evaluation, not after it
        output(args, args.json, None, "--json")
    model = saved.model
    x, y, ds = load_examples(args, saved)
    mode = args.binarize
    if mode == "auto":
        # As the trainer scored its test set: one fixed draw for a binarized run.
        recorded = saved.binarize if saved.binarize is not None else (
            "dynamic" if model.config["decoder"] == "bernoulli" else "none")
        mode = "none" if recorded == "none" else "static"
    if mode == "static":
        if model.config["decoder"] != "bernoulli":
            raise CLIError("--binarize static: binarized targets need the bernoulli decoder")
        x = binarize(x, "static", np.random.default_rng(args.seed))
    backend = model.backend
    rng = backend.rng(args.seed)
    totals, values = np.zeros(3), []
    for start in range(0, len(x), args.batch_size):
        batch = slice(start, start + args.batch_size)
        extra = class_args(model, None if y is None else y[batch])
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # checked: FloatingPointError
                terms = model.loss(x[batch], rng=rng, **extra)
        except FloatingPointError:  # its message is about training, which this is not
            raise CLIError(f"dataset: the model's loss on examples {start}.. of "
                           f"{ds.description} is not finite (NaN or inf): their values (up "
                           f"to {float(np.max(np.abs(x[batch]))):g} in size) lie far outside "
                           f"what the model in {saved.path} was trained on") from None
        totals += np.array([float(host(model, t)) for t in (terms.loss, terms.kl, terms.recon)]) \
            * len(x[batch])
        if args.K > 0:
            values.append(host(model, model.log_likelihood(x[batch], num_samples=args.K,
                                                           rng=rng, **extra)))
    loss, kl, recon = totals / len(x)
    # on the same (binarized) examples as the -ELBO
    starts = range(0, len(x), args.batch_size)
    active = active_units(model, (x[i:i + args.batch_size] for i in starts),
                          None if y is None or not model.config.get("num_classes")
                          else (y[i:i + args.batch_size] for i in starts))
    result = {"checkpoint": str(saved.path), "dataset": ds.description, "split": args.split,
              "n_examples": int(len(x)), "binarize": mode,
              "neg_elbo": loss, "kl": kl, "recon": recon, "active_units": active,
              "log_likelihood": None}
    say(f"{args.split} -ELBO: {loss:.2f} nats/example (reconstruction {recon:.2f}, KL {kl:.2f}"
        f"; {len(x):,} examples of {ds.description}, {mode} binarization)")
    say(active_units_line(active, images=f"{args.split} examples"))
    if values:
        summary = log_likelihood_summary(np.concatenate(values))
        stderr = summary["stderr"]
        result["log_likelihood"] = {"mean": summary["mean"], "stderr": stderr,
                                    "num_samples": args.K}
        say(f"{args.split} ln p(x) = {summary['mean']:.2f}"
            + (f" +- {stderr:.2f}" if stderr is not None else "")
            + f" nats/example (importance sampling, K = {args.K})")
    say(f"(this command's own draws, --seed {args.seed}: "
        + (f"a {mode} binarization and " if mode != "none" else "")
        + "the noise; the training run's last lines used its own, so the numbers differ from "
          "them by that sampling error)")
    if args.json:
        atomic_write(Path(args.json), lambda fh: fh.write(
            (json.dumps(result, indent=2) + "\n").encode()))
        say(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG, description="Train a VAE with hand-written backprop (NumPy / CuPy), and "
                               "use a trained one: sample, reconstruct, encode, "
                               "interpolate, traverse, evaluate.",
        epilog=LOSS_SCALING)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    subs.required = True
    parser.subcommand_parsers = subs.choices  # main() asks one which flags were typed
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = subs.add_parser("train", help="train a model (the flags of examples/train_mnist.py)",
                            add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)

    p = subs.add_parser("sample", help="decode draws from the prior", formatter_class=fmt,
                        description="Decode z ~ N(0, I): a PNG of decoder means (and, with "
                                    "--npy or an OUT ending in .npy, the array).")
    add_model_flags(p)
    p.add_argument("--n", type=positive_int, default=64, help="how many samples")
    p.add_argument("--nrow", type=positive_int, default=None,
                   help="images per row (default 8; a conditional model without --label "
                        "draws a row per class)")
    p.add_argument("--out", default="samples.png", help="the PNG (or .npy) to write")
    p.add_argument("--npy", action="store_true", help="also write the decoder means, (n, D), "
                                                      "as OUT with the suffix .npy")
    p.add_argument("--label", type=nonnegative_int, default=None,
                   help="conditional models: the class to draw (default: a row per class)")
    p.set_defaults(run=cmd_sample)

    p = subs.add_parser("reconstruct", help="examples next to their reconstructions",
                        formatter_class=fmt,
                        description="Examples of DATA above their reconstructions (the decoder "
                                    "mean at the posterior mean, z = mu(x)).")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--n", type=positive_int, default=32, help="how many examples")
    p.add_argument("--out", default="reconstructions.png", help="the PNG to write")
    p.set_defaults(run=cmd_reconstruct)

    p = subs.add_parser("encode", help="posterior means and log-variances of a data set",
                        formatter_class=fmt,
                        description="Write mu and logvar of q(z|x), (N, d) each, for every "
                                    "example of the split (and its labels y, if any) to an "
                                    ".npz file.")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", default="codes.npz", help="the .npz to write")
    p.add_argument("--batch-size", type=positive_int, default=500, help="examples per call")
    p.set_defaults(run=cmd_encode)

    p = subs.add_parser("interpolate", help="decode paths between two examples' codes",
                        formatter_class=fmt,
                        description="Pick random pairs of examples, encode them (posterior "
                                    "means) and decode points on the path between them: one "
                                    "row per pair, the two examples at its ends.")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--pairs", type=positive_int, default=8, help="rows: pairs of examples")
    p.add_argument("--steps", type=at_least_two, default=10,
                   help="decoded points per path, both ends included")
    p.add_argument("--spherical", action="store_true",
                   help="spherical interpolation (slerp) instead of linear")
    p.add_argument("--out", default="interpolation.png", help="the PNG to write")
    p.add_argument("--npy", action="store_true",
                   help="also write the decoded paths, (pairs, steps, D), as OUT.npy")
    p.set_defaults(run=cmd_interpolate)

    p = subs.add_parser("traverse", help="move along each latent dimension in turn",
                        formatter_class=fmt,
                        description="A latent traversal: one row per latent dimension, that "
                                    "coordinate moved from -RANGE to +RANGE around a base "
                                    "point (z = 0, or with --dataset the posterior mean of "
                                    "example --index, rows ordered by each dimension's mean KL "
                                    "over the first --batch-size examples, the most used first).")
    add_model_flags(p)
    add_data_flags(p, required=False)
    p.add_argument("--index", type=nonnegative_int, default=None,
                   help="with --dataset: the example whose code is the base point "
                        "(default 0)")
    p.add_argument("--steps", type=positive_int, default=9, help="images per row")
    p.add_argument("--range", type=positive_float, default=3.0,
                   help="move each coordinate by -RANGE..RANGE (prior standard deviations)")
    p.add_argument("--max-dims", type=positive_int, default=10, help="at most this many rows")
    p.add_argument("--batch-size", type=positive_int, default=500,
                   help="examples whose KL ranks the dimensions")
    p.add_argument("--label", type=nonnegative_int, default=None,
                   help="conditional models: the class to decode (default: the example's, "
                        "or 0)")
    p.add_argument("--out", default="traversal.png", help="the PNG to write")
    p.set_defaults(run=cmd_traverse)

    p = subs.add_parser("eval", help="test -ELBO, importance-sampled ln p(x), active units",
                        formatter_class=fmt, epilog=LOSS_SCALING,
                        description="The negative ELBO (an upper bound on -ln p(x)) and the "
                                    "importance-sampled ln p(x) with K samples per example, "
                                    "both in nats per example, over the split; and the "
                                    "active units: the latent dimensions whose encoder "
                                    "mean varies over the split with variance > 0.01 "
                                    "(Burda et al. 2015).")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("-K", "--num-samples", dest="K", type=nonnegative_int, default=1000,
                   help="importance samples per example for ln p(x) (0: skip; papers use 5000)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="examples per batch")
    p.add_argument("--binarize", choices=("auto", "none", "static"), default="auto",
                   help="targets: auto scores as the run was trained (one seeded 0/1 draw "
                        "for a binarized run, the trainer's test protocol); none: the "
                        "intensities; static: one seeded draw")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(run=cmd_eval)

    add_interop_commands(subs, fmt)
    return parser


def _train(argv: Sequence[str]) -> int:
    from .train_cli import main as train_main  # argparse and the trainer: only when training

    return train_main(list(argv), prog=f"{PROG} train")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vae-np`` with ``argv`` (default: the command line); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    # the data-source flags typed; load() takes the others from the checkpoint
    args.data_given = typed_flags(parser.subcommand_parsers[args.command], argv[1:],
                                  DATA_SOURCE_FLAGS)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or evaluating: nothing half-written
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, CheckpointError, FileNotFoundError, BackendUnavailableError,
            ImportError, ValueError, TypeError, OSError) as exc:
        # One line, no traceback: a missing or damaged checkpoint, unusable data, no GPU.
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
