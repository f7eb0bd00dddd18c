"""The numbers a run keeps: per-batch losses, per-epoch metrics (metrics.jsonl), results.json.

Units: every loss is in nats per image, the mean over the images of an epoch (train)
or of the whole test set (test). The train numbers are the running mean over the epoch's
minibatches (the parameters change during the epoch), as most training scripts report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..checkpoint import atomic_write

__all__ = ["EPOCH_METRICS", "METRICS_FILE", "RESULTS_FILE", "BatchTerms", "epoch_entry",
           "prepare_files", "run_results", "weighted_mean", "write_metrics",
           "write_results"]

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

#: The keys of one epoch's entry in ``Trainer.history`` and ``metrics.jsonl``.
EPOCH_METRICS = (
    "epoch",
    "train_loss", "train_kl", "train_recon",     # nats per image, running mean over the epoch
    "test_loss", "test_kl", "test_recon",        # nats per image, whole test set, end of epoch
    "train_seconds", "images_per_second",        # the training pass only (no evaluation)
    "eval_seconds", "updates",                   # test ELBO time; optimizer steps so far
)


def epoch_entry(epoch: int, train: np.ndarray, test: Mapping[str, float], seconds: float,
                images: int, eval_seconds: float, updates: int) -> dict[str, Any]:
    """One epoch's entry of the history (keys ``EPOCH_METRICS``): ``train`` (3,) its mean
    (loss, KL, recon); ``test`` the test set's ``{"loss", "kl", "recon"}``; ``seconds``
    and ``images`` its training pass; ``updates`` the optimizer's steps so far."""
    return {
        "epoch": epoch,
        "train_loss": float(train[0]), "train_kl": float(train[1]),
        "train_recon": float(train[2]),
        "test_loss": test["loss"], "test_kl": test["kl"], "test_recon": test["recon"],
        "train_seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
        "eval_seconds": eval_seconds, "updates": updates,
    }


def run_results(config, data: Mapping[str, Any], backend, model,
                history: Sequence[Mapping[str, Any]],
                log_likelihood: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``results.json`` holds after a run: its config (a ``TrainConfig``), data
    (``RunData.summary()``), backend, model size, objective, the last epoch's metrics of
    ``history``, the test ln p(x) (None when not estimated) and the total training time."""
    return {
        "config": config.to_dict(),
        "data": dict(data),
        "backend": f"{backend.name}/{backend.dtype_name}",
        "num_parameters": model.num_parameters,
        "objective": config.objective_summary(),
        "epochs": len(history),
        "final_epoch": history[-1],
        "test_log_likelihood": log_likelihood,
        "train_seconds_total": sum(e["train_seconds"] for e in history),
    }


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of rows ``values`` (B, k) weighted by ``weights`` (B,), in float64: (k,)."""
    weights = np.asarray(weights, dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) * weights[:, None]).sum(axis=0) / weights.sum()


class BatchTerms:
    """One epoch's per-batch (loss, KL, recon), nats per image: written on the device
    each batch, copied to the host in pieces.

    ``record`` stores a batch's terms on the device (no transfer, so a GPU step does not
    wait for the host); ``read`` copies only the rows recorded since the last read and
    returns every row so far from the host copy. Reading the whole prefix at every log
    step instead would transfer O(B^2) rows per epoch.

    Args:
        backend: the run's backend. num_batches: B, batches in the epoch.
        done: host rows of batches trained before (a resumed epoch), (first, 3).
    """

    def __init__(self, backend, num_batches: int, done: np.ndarray):
        self.backend = backend
        self._device = backend.zeros((num_batches, 3))
        self._host = np.empty((num_batches, 3), dtype=backend.numpy_dtype)
        self._read = len(done)
        self._host[:self._read] = done

    def record(self, batch: int, terms) -> None:
        """Store ``terms`` (an ``ELBOTerms``: 0-d loss, kl, recon) as row ``batch``."""
        xp = self.backend.xp
        self._device[batch, :] = xp.stack([terms.loss, terms.kl, terms.recon])

    def read(self, upto: int) -> np.ndarray:
        """Rows ``[0, upto)`` on the host, (upto, 3); copies only rows not read before."""
        if upto > self._read:
            self._host[self._read:upto] = self.backend.to_numpy(self._device[self._read:upto, :])
            self._read = upto
        return self._host[:upto]


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_metrics(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> Path:
    """``out_dir/metrics.jsonl``: one JSON object per finished epoch."""
    lines = "".join(json.dumps(entry) + "\n" for entry in history)
    # Rewritten whole from the history, so after a resume it matches the checkpoint.
    return write_text(out_dir / METRICS_FILE, lines)


def prepare_files(out_dir: Path, history: Sequence[Mapping[str, Any]], fresh: bool) -> None:
    """Before a run trains into ``out_dir``: a ``fresh`` one removes the metrics and
    results of an earlier run there (they no longer apply); a resumed one rewrites
    metrics.jsonl from ``history``, in step with its checkpoint."""
    if fresh:
        for name in (RESULTS_FILE, METRICS_FILE):
            (out_dir / name).unlink(missing_ok=True)
    else:
        write_metrics(out_dir, history)


def write_results(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """``out_dir/results.json``: the final summary."""
    return write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
