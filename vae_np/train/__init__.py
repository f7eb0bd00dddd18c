"""Training a VAE on MNIST: the loop, evaluation, checkpoints, metrics and pictures.

The library side of ``examples/train_mnist.py``, usable from Python::

    from vae_np.data import load_mnist
    from vae_np.train import TrainConfig, Trainer

    dataset = load_mnist()                                  # full MNIST, or the subset
    trainer = Trainer(TrainConfig(epochs=10), dataset, out_dir="results")
    results = trainer.fit()                                 # also in results/results.json
    # after Ctrl-C, a crash, or to train for more epochs:
    Trainer.resume("results", dataset, overrides={"epochs": 20}).fit()

What a run leaves in ``out_dir``:

    checkpoint.npz      model, optimizer, position, RNG state, config, history
                        (pickle-free, written atomically: see ``vae_np.checkpoint``)
    metrics.jsonl       one JSON object per finished epoch (keys: ``EPOCH_METRICS``)
    results.json        the final summary, with the importance-sampled test ln p(x)
                        and the active units
    reconstructions.png, samples.png, loss_curves.png   refreshed every epoch
    manifold.png, latent_scatter.png                    also, when latent_dim == 2
    .lock               while a run writes there (pid and host; removed at the end)

Units: every loss is in nats per image, the mean over the images of an epoch (train)
or of the whole test set (test). The train numbers are the running mean over the epoch's
minibatches (the parameters change during the epoch), as most training scripts report.

Reproducibility. Every random draw of a run comes from its own stream, keyed by
``(seed, purpose)`` or ``(seed, purpose, epoch)`` (``Stream`` lists the purposes): the
batch order and the dynamic binarization of epoch e, the reparameterisation noise of
epoch e, and so on. A run is therefore a deterministic function of its config and its
data, and a checkpoint needs only the position (epochs done, batches done in the
current epoch) plus the state of the one stream that is consumed batch by batch, the
training noise. Resuming reproduces the uninterrupted run bit for bit, whether it
stopped at the end of an epoch or in the middle of one.

Interrupts. The first Ctrl-C (or SIGTERM, which ``kill`` and batch schedulers send) asks
the loop to stop at the next batch boundary; the
trainer then saves a checkpoint at exactly that batch and raises
:class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A second Ctrl-C, or a
``KeyboardInterrupt`` raised by other code, stops at once; if it lands inside an
optimizer update the parameters may be half updated, so the trainer then keeps the
checkpoint already on disk (the last finished epoch, or the last interrupt) and a resume
restarts from there. Either way a resume ends where the uninterrupted run would.

Divergence. The losses stay on the device and are read back every ``log_every``
batches (so a GPU step does not wait for the host each batch), only the rows added
since the last read. A NaN or infinite loss stops training with
:class:`TrainingDiverged`, naming the epoch and the first bad batch; nothing is saved
after it, so the last good checkpoint stays on disk.

One concern per module:

    config      TrainConfig: what defines a run, its checks, what a resume may change;
                presets (burda2015) and the learning-rate schedules
    streams     Stream: the keyed random streams behind reproducibility
    rundata     RunData: the run's images on the backend, selected, binarized, batched;
                dataset_identity, what the ranks of a job compare before they meet
    trainer     Trainer: the parts put together, and the loop (fit, one epoch); one
                process is a communicator of one rank (vae_np.distributed.SingleProcess)
    step        one batch's loss and gradient, sharded over the communicator's ranks
    guards      Ctrl-C (and SIGTERM) at a batch boundary; non-finite losses and parameters
    initialise  a Gaussian-decoder model started at its data's scale
    state       what a checkpoint holds; writing it, and checking every field on resume
    outdir      the output directory checked before any work, and its lock
    metrics     per-batch terms, metrics.jsonl, results.json
    evaluation  test negative ELBO; importance-sampled ln p(x) and its standard error
                (each batch sharded over the ranks, with a conditional model's labels)
    active_units  the latent dimensions the encoder uses (Burda et al. 2015, sec. 5.2)
    pictures    the PNGs of each epoch
    report      what is printed: messages, progress bars, the epoch line
"""

from .config import TrainConfig
from .guards import TrainingDiverged, TrainingInterrupted
from .metrics import EPOCH_METRICS, METRICS_FILE, RESULTS_FILE
from .outdir import LOCK_FILE, OutDirInUse, OutDirLock, check_out_dir
from .rundata import RunData
from .state import CHECKPOINT_FILE, CHECKPOINT_FORMAT, SavedRun, read_run
from .streams import Stream
from .trainer import Trainer

__all__ = [
    "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "EPOCH_METRICS", "LOCK_FILE", "METRICS_FILE",
    "RESULTS_FILE", "OutDirInUse", "OutDirLock", "RunData", "SavedRun", "Stream",
    "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted", "check_out_dir",
    "read_run",
]
