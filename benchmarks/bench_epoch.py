"""Time one whole training epoch of the default configuration on MNIST: vae_np's Trainer
against PyTorch and JAX, side by side in one process.

    python benchmarks/bench_epoch.py                         # full MNIST, one epoch a side
    python benchmarks/bench_epoch.py --repeats 3 --json epoch.json
    python benchmarks/bench_epoch.py --limit-train 640 --limit-test 500   # a smoke run

The default configuration: 784-512-512 encoder, latent 64, Bernoulli decoder, ReLU, Adam
lr 1e-3, batch 32, float32, dynamic binarization (each training image drawn to 0/1 afresh
from its intensities), S = 1. An epoch is everything it costs: binarization, shuffling and
batching, the training steps, and the test -ELBO over the test set (one sample, batches of
500) that the trainer reports after each epoch.

- vae_np: the real ``vae_np.train.Trainer``, no pictures, eval_samples=0 (no ln p(x)),
  for two epochs; the second is timed, the state every epoch of a run after its first is
  in (the epoch's image buffer kept from the one before; the first epoch's data seconds,
  into fresh memory, are printed beside). Its checkpoints and metrics.jsonl are written,
  as every epoch writes them, into a temporary folder that is removed afterwards.
  Training = the epoch's shuffle, gather and binarization (``RunData.epoch_batches`` and
  ``epoch_train_data``, timed around the calls) plus the step loop (metrics'
  ``train_seconds``); evaluation = metrics' ``eval_seconds``. The checkpoint and the
  whole ``fit()`` are printed beside them.
- PyTorch: ``DataLoader(TensorDataset(x_train), batch_size=32, shuffle=True)`` (the last,
  smaller batch kept, as vae_np keeps it), ``torch.bernoulli`` per batch, the step of
  ``peers.TorchVAE`` with fused Adam; the test -ELBO under ``torch.no_grad()`` on one
  fixed binarization of the test set.
- JAX: NumPy's permutation and gather on the host, binarization by ``jax.random.bernoulli``
  inside the jitted step (``peers.JaxVAE(binarize=True)``), ``block_until_ready`` at the
  end of the loop, the jitted test -ELBO on one fixed (host, NumPy) binarization.

Every side starts from vae_np's initial weights. Before timing, each side warms up (untimed,
its seconds printed): a few steps and test batches, so JAX's XLA compilation (once per
batch shape) and first-call allocations stay out of the epoch. The test set's one fixed
binarization is set-up too, on every side. With ``--repeats R`` the sides take turns R
times (vae_np, torch, jax, vae_np, ...) and the medians are reported; a ratio is the median
of the repeats' own pairs (``bench_step.paired_ratio``). The sides draw from
different random streams, so their test -ELBOs after the epoch agree in range, not exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import vae_np
except ImportError:  # run from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vae_np

from vae_np.checkpoint import atomic_write
from vae_np.cli_args import positive_int
from vae_np.data import ChecksumError, Dataset, MNISTFormatError, load_mnist_files
from vae_np.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import blas_info, cpu_model, note_forced_blas_kernel, paired_ratio, set_threads  # noqa: E402
from peers import JaxVAE, TorchVAE, import_jax  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "mnist"
SIDES = ("vae_np", "torch", "jax")
SEED = 0


def default_config(**changes) -> TrainConfig:
    """The default configuration for one epoch: TrainConfig's defaults (784-512-512-64,
    Bernoulli, ReLU, Adam 1e-3, batch 32, float32, dynamic binarization, S = 1, test
    batches of 500) with no ln p(x)."""
    return TrainConfig(epochs=1, eval_samples=0, seed=SEED, backend="numpy", **changes)


def peer_config(config: TrainConfig) -> dict:
    """The peers' description (peers.layer_sizes) of ``config``'s model."""
    return {"hidden": config.hidden, "latent_dim": config.latent_dim,
            "activation": config.activation, "input_shift": config.input_shift}


def first_images(dataset: Dataset, n_train: int | None, n_test: int | None) -> Dataset:
    """The first ``n_train`` / ``n_test`` images of each split (None: all), the same
    images for every side."""
    n_train = dataset.n_train if n_train is None else n_train
    n_test = dataset.n_test if n_test is None else n_test
    if n_train == dataset.n_train and n_test == dataset.n_test:
        return dataset
    labels = dataset.y_train is not None
    return dataclasses.replace(
        dataset, x_train=dataset.x_train[:n_train], x_test=dataset.x_test[:n_test],
        y_train=dataset.y_train[:n_train] if labels else None,
        y_test=dataset.y_test[:n_test] if labels else None,
        description=f"{dataset.description}, first {n_train:,} train / {n_test:,} test")


# ------------------------------------------------------------------------------------------
# The sides: each runs one epoch from the initial weights and returns its seconds


def _timed(record: dict, fn, key):
    """``fn`` that adds its wall seconds to ``record[key()]`` on every call."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            slot = key()
            record[slot] = record.get(slot, 0.0) + time.perf_counter() - start
    return wrapper


def vae_np_epoch(dataset: Dataset, config: TrainConfig) -> dict:
    """The second epoch of a two-epoch ``Trainer.fit()`` in a temporary folder (checkpoints
    and metrics go there and are removed): the state every epoch of a run after its first
    is in, with the epoch's image buffer kept from the one before. Seconds of that epoch:
    ``data`` (its shuffle, gather and dynamic binarization), ``steps`` (metrics'
    train_seconds), ``eval`` (eval_seconds), ``checkpoint``; ``train`` = data + steps;
    ``first_data``: the first epoch's data seconds (its buffer fresh); ``fit``: all of
    fit() (both epochs, the lock, metrics.jsonl, the active units over the test set and
    results.json); ``test_loss``, nats, after the first epoch, which starts from the
    initial weights the peers' one epoch starts from."""
    config = dataclasses.replace(config, epochs=2)
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as out:
        trainer = Trainer(config, dataset, out, log=None, progress=False, pictures=False)
        data, checkpoint = {}, {}
        # Instance attributes shadow the methods: the trainer calls the timed ones. The
        # data is prepared before epoch epochs_done + 1; each epoch's checkpoint is saved
        # once epochs_done counts it.
        def epoch():
            return trainer.epochs_done + 1

        trainer.data.epoch_batches = _timed(data, trainer.data.epoch_batches, epoch)
        trainer.data.epoch_train_data = _timed(data, trainer.data.epoch_train_data, epoch)
        trainer.save_checkpoint = _timed(checkpoint, trainer.save_checkpoint,
                                         lambda: trainer.epochs_done)
        start = time.perf_counter()
        trainer.fit()
        fit = time.perf_counter() - start
    entry = trainer.history[-1]
    return {"train": data[2] + entry["train_seconds"], "eval": entry["eval_seconds"],
            "data": data[2], "first_data": data[1], "steps": entry["train_seconds"],
            "checkpoint": checkpoint[2], "fit": fit,
            "test_loss": trainer.history[0]["test_loss"]}


class TorchSide:
    """PyTorch on the CPU: a DataLoader over the float32 intensities, torch.bernoulli per
    batch, peers.TorchVAE's step with fused Adam, the test -ELBO under no_grad."""

    def __init__(self, torch, dataset: Dataset, config: TrainConfig, init: dict):
        self.torch, self.config, self.init = torch, config, init
        self.train_set = torch.utils.data.TensorDataset(torch.from_numpy(dataset.x_train))
        torch.manual_seed(SEED + 1)  # the test set's one fixed binarization (set-up)
        self.x_test = torch.bernoulli(torch.from_numpy(dataset.x_test))

    def _peer(self):
        return TorchVAE(self.torch, "cpu", self.config.dtype, peer_config(self.config),
                        self.init, fused_adam=True)

    def warm_up(self) -> None:
        peer, batch = self._peer(), self.config.batch_size
        x = self.torch.bernoulli(self.train_set.tensors[0][:batch])
        for _ in range(3):
            peer.train_step(x)
        peer.test_loss_sum(self.x_test[:self.config.eval_batch_size])

    def epoch(self) -> dict:
        torch, cfg = self.torch, self.config
        torch.manual_seed(SEED)
        peer = self._peer()
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size,
                                             shuffle=True, drop_last=False)
        for (x,) in loader:
            peer.train_step(torch.bernoulli(x))
        peer.sync()
        train = time.perf_counter() - start
        start = time.perf_counter()
        total = sum(float(peer.test_loss_sum(x)) for x in self.x_test.split(cfg.eval_batch_size))
        test_loss = total / len(self.x_test)
        return {"train": train, "eval": time.perf_counter() - start, "test_loss": test_loss}


class JaxSide:
    """JAX on the CPU: NumPy's permutation and gather on the host, the jitted step of
    peers.JaxVAE binarizing inside it, the jitted test -ELBO on a host binarization."""

    def __init__(self, jax, dataset: Dataset, config: TrainConfig, init: dict):
        self.jax, self.config = jax, config
        self.x_train = dataset.x_train
        rng = np.random.default_rng(SEED + 1)  # the test set's one fixed binarization
        x_test = (dataset.x_test > rng.random(dataset.x_test.shape, dtype=np.float32))
        size = config.eval_batch_size
        self.test_batches = [jax.numpy.asarray(x_test[i:i + size], dtype=np.float32)
                             for i in range(0, len(x_test), size)]
        self.n_test = len(x_test)
        self.peer = JaxVAE(jax, config.dtype, peer_config(config), init, seed=SEED,
                           binarize=True)

    def warm_up(self) -> None:
        """One step per training batch shape and one whole test pass (XLA compiles once
        per shape, and the key split and indexing once), then back to the initial state."""
        n, batch = len(self.x_train), self.config.batch_size
        for size in {min(batch, n), n % batch} - {0}:
            self.peer.train_step(self.x_train[:size])
        self.peer.sync()
        self._test_loss()
        self.peer.reset()

    def _test_loss(self) -> float:
        """The test -ELBO, nats per image (reading it back waits for the device)."""
        jax = self.jax
        keys = jax.random.split(jax.random.PRNGKey(SEED + 2), len(self.test_batches))
        sums = [self.peer.test_loss_sum(x, keys[i]) for i, x in enumerate(self.test_batches)]
        return sum(float(s) for s in sums) / self.n_test

    def epoch(self) -> dict:
        cfg, peer = self.config, self.peer
        peer.reset()
        start = time.perf_counter()
        order = np.random.default_rng(SEED).permutation(len(self.x_train))
        for lo in range(0, len(order), cfg.batch_size):
            peer.train_step(self.x_train[order[lo:lo + cfg.batch_size]])
        peer.sync()
        train = time.perf_counter() - start
        start = time.perf_counter()
        test_loss = self._test_loss()
        return {"train": train, "eval": time.perf_counter() - start, "test_loss": test_loss}


# ------------------------------------------------------------------------------------------
# The run


def parse_sides(text: str) -> list[str]:
    sides = [s for s in text.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SIDES)}, got {text!r}")
    return sides


def seconds(runs: list[dict], key: str) -> list[float]:
    """One side's ``key`` seconds ("train", "eval" or their "total") in each repeat."""
    return [run["train"] + run["eval"] if key == "total" else run[key] for run in runs]


def summarise(runs: list[dict], n_train: int) -> dict:
    """Medians over the repeats of each number, the total and the training images/s."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["total"] = statistics.median(seconds(runs, "total"))
    med["train_images_per_s"] = n_train / med["train"]
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="the four MNIST files (gzipped or raw)")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="the first N training images only (default: all)")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="the first N test images only (default: all)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(),
                   help="threads for BLAS (vae_np) and PyTorch alike")
    p.add_argument("--sides", type=parse_sides, default=list(SIDES),
                   help=f"comma-separated, from {','.join(SIDES)}")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="epochs per side, the sides taking turns; medians reported")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    try:
        full = load_mnist_files(args.data_dir)
    except (OSError, ChecksumError, MNISTFormatError) as exc:
        print(f"bench_epoch.py: error: {exc} (--data-dir names the folder of the four "
              f"MNIST files)", file=sys.stderr)
        return 2
    for name, limit, have in (("--limit-train", args.limit_train, full.n_train),
                              ("--limit-test", args.limit_test, full.n_test)):
        if limit is not None and limit > have:
            print(f"bench_epoch.py: error: {name} {limit}: the data set has {have:,} images",
                  file=sys.stderr)
            return 2
    dataset = first_images(full, args.limit_train, args.limit_test)
    config = default_config()

    keep_alive = set_threads(args.threads)  # noqa: F841 -- the limits hold while it lives
    frameworks = {}
    for side in args.sides:
        if side != "vae_np":
            try:   # JAX through peers.import_jax: one XLA thread for --threads 1
                frameworks[side] = import_jax(args.threads) if side == "jax" else __import__(side)
                if frameworks[side] is None:
                    raise ImportError(side)
            except ImportError:
                frameworks.pop(side, None)
                print(f"note: {side} is not installed; its side is skipped")
    if "torch" in frameworks:
        frameworks["torch"].set_num_threads(args.threads)
    sides = [s for s in args.sides if s == "vae_np" or s in frameworks]

    machine = {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "python": platform.python_version(), "numpy": np.__version__,
        "vae_np": vae_np.__version__, "blas": blas_info(),
        **{f"{name}": module.__version__ for name, module in frameworks.items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_at_start": os.getloadavg(),
    }
    print(f"machine: {machine['cpu_model']}, {args.threads} threads of {os.cpu_count()} "
          f"cores; " + ", ".join(f"{k} {machine[k]}" for k in ("numpy", *frameworks)))
    note_forced_blas_kernel()
    if "jax" in frameworks and args.threads > 1:
        print("note: XLA sizes its own CPU thread pool; --threads limits it only at 1")
    steps = -(-dataset.n_train // config.batch_size)
    print(f"data: {dataset.description} from {args.data_dir}; batch {config.batch_size}, "
          f"{steps} steps, test -ELBO in batches of {config.eval_batch_size}")

    # the initial weights every side starts from: the Trainer's model before any step
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as out:
        init = {k: v.copy() for k, v in Trainer(config, dataset, out, log=None, progress=False,
                                                pictures=False).model.state_dict().items()}

    warm_up = {}
    runners = {}
    for side in sides:
        start = time.perf_counter()
        if side == "vae_np":  # numba's kernels load from its disk cache on first call
            small = first_images(dataset, min(dataset.n_train, 2 * config.batch_size),
                                 min(dataset.n_test, config.eval_batch_size))
            vae_np_epoch(small, config)
            runners[side] = lambda: vae_np_epoch(dataset, config)
        else:
            cls = TorchSide if side == "torch" else JaxSide
            runner = cls(frameworks[side], dataset, config, init)
            runner.warm_up()
            runners[side] = runner.epoch
        warm_up[side] = time.perf_counter() - start
    print("warm-up (untimed; JAX: XLA compiles its step and test batch per shape): "
          + ", ".join(f"{s} {t:.2f} s" for s, t in warm_up.items()))

    runs = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in sides:
            runs[side].append(runners[side]())
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{s} {runs[s][-1]['train'] + runs[s][-1]['eval']:.2f} s" for s in sides),
            flush=True)

    results = {side: summarise(runs[side], dataset.n_train) for side in sides}
    print(f"\none epoch, median of {args.repeats} (seconds; train img/s = training images "
          f"/ training seconds):")
    print(f"{'side':7} {'train s':>8} {'eval s':>8} {'total s':>8} {'train img/s':>11} "
          f"{'test -ELBO':>10}")
    for side, m in results.items():
        print(f"{side:7} {m['train']:8.2f} {m['eval']:8.2f} {m['total']:8.2f} "
              f"{m['train_images_per_s']:11.0f} {m['test_loss']:10.2f}")
    ratios = {}
    if "vae_np" in results:
        ours = results["vae_np"]
        print(f"vae_np in detail (its second epoch): shuffle, gather and binarization "
              f"{ours['data']:.2f} s ({ours['first_data']:.2f} s in the first epoch, into "
              f"fresh memory), steps {ours['steps']:.2f} s; besides the epoch: checkpoint "
              f"{ours['checkpoint']:.2f} s (into a temporary folder, removed after), the "
              f"whole two-epoch fit() {ours['fit']:.2f} s (with metrics.jsonl, active "
              "units over the test set, results.json)")
        for side in results:
            if side != "vae_np":
                # each repeat's own pair (the sides take turns within a repeat)
                ratios[side] = {k: paired_ratio(seconds(runs["vae_np"], k),
                                                seconds(runs[side], k))[0]
                                for k in ("train", "eval", "total")}
                print(f"vae_np / {side}: train {ratios[side]['train']:.2f}, eval "
                      f"{ratios[side]['eval']:.2f}, total {ratios[side]['total']:.2f}")
    print("test -ELBO after one epoch (nats/image; vae_np: its first): " + ", ".join(
        f"{s} {m['test_loss']:.2f}" for s, m in results.items())
          + " -- same initial weights, different random streams: the same range, not equal")

    machine["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {machine['load_average_at_start']}, at end "
          f"{machine['load_average_at_end']}")
    if args.json:
        report = {"machine": machine, "data": {"description": dataset.description,
                                               "n_train": dataset.n_train,
                                               "n_test": dataset.n_test},
                  "config": config.to_dict(), "warm_up_seconds": warm_up, "runs": runs,
                  "median": results, "ratios_vae_np_over": ratios}
        text = json.dumps(report, indent=1).encode()
        atomic_write(args.json, lambda fh: fh.write(text))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
