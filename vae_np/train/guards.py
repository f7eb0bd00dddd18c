"""What stops a run: Ctrl-C at a batch boundary, and losses or parameters that are not finite.

The rules (the package docstring, "Interrupts" and "Divergence", has them in full): the
first Ctrl-C stops at the next batch boundary with a checkpoint of exactly that batch; a
second one, or one inside an optimizer update, stops at once and keeps the checkpoint on
disk; a NaN or infinite loss stops with :class:`TrainingDiverged` and saves nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import numpy as np

__all__ = ["StopOnCtrlC", "TrainingDiverged", "TrainingInterrupted", "diverged",
           "first_non_finite_row", "interrupted", "sigterm_as_ctrl_c"]


class TrainingDiverged(FloatingPointError):
    """A loss or a parameter became NaN or infinite; nothing was saved after it.

    Attributes: ``epoch`` and ``batch`` (1-based; the first batch whose loss was not
    finite), ``checkpoint`` (the last good checkpoint, or None if none was written).
    """

    def __init__(self, message: str, epoch: int, batch: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.batch, self.checkpoint = epoch, batch, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C. ``checkpoint`` is the file to resume from (or None),
    ``epochs_done`` and ``batches_done`` the position it holds."""

    def __init__(self, message: str, checkpoint: Path | None, epochs_done: int,
                 batches_done: int):
        super().__init__(message)
        self.checkpoint, self.epochs_done, self.batches_done = checkpoint, epochs_done, batches_done

    def __str__(self) -> str:
        return self.args[0]


#: The signals a run stops on as on Ctrl-C: SIGTERM too (what kill, systemd and batch
#: schedulers send), so a terminated run keeps its partial epoch and releases its lock.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM")
                     if hasattr(signal, name))


class StopOnCtrlC:
    """``with stop:`` turns the first SIGINT or SIGTERM into a request the loop polls with
    ``stop.check()`` at batch boundaries; a second one gets the handler found back
    (normally: KeyboardInterrupt at once; SIGTERM's default, which would end the process
    without unwinding, becomes KeyboardInterrupt too). Outside the main thread, or where
    SIGINT is ignored, nothing is installed and Ctrl-C keeps its usual meaning; an ignored
    SIGTERM stays ignored."""

    def __init__(self):
        self.requested = False
        self._restore = None  # {signal: handler} to put back on exit; None: nothing installed

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was requested."""
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopOnCtrlC":
        self.requested = False
        previous = signal.getsignal(signal.SIGINT)
        if (threading.current_thread() is not threading.main_thread()
                or previous is signal.SIG_IGN):  # signals go to the main thread only
            return self
        found = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self._restore = {sig: h for sig, h in found.items() if h is not signal.SIG_IGN}
        second = {sig: _second_signal_handler(sig, h) for sig, h in self._restore.items()}

        def request_stop(signum, frame):
            # Only set flags here: printing from a signal handler can re-enter I/O.
            self.requested = True
            for sig, handler in second.items():
                signal.signal(sig, handler)

        for sig in self._restore:
            signal.signal(sig, request_stop)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._restore is not None:
            for sig, handler in self._restore.items():
                signal.signal(sig, handler if handler is not None
                              else _second_signal_handler(sig, handler))
            self._restore = None


def _second_signal_handler(sig, found):
    """What a second stop signal meets: the handler ``found``; KeyboardInterrupt where none
    was set from Python (None) or where SIGTERM had its default (killed, not unwound)."""
    if found is None or (sig != signal.SIGINT and found == signal.SIG_DFL):
        return signal.default_int_handler
    return found


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does (main thread only;
    elsewhere nothing changes), so that what runs before training (loading the data)
    unwinds too: the lock is released, an empty --out removed."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def first_non_finite_row(terms: np.ndarray) -> int | None:
    """Index of the first row of ``terms`` (B, k) holding a NaN or infinity, else None."""
    bad = ~np.all(np.isfinite(terms), axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def diverged(epoch: int, batch: int, batches_per_epoch: int, loss_value,
             saved_position: tuple[int, int] | None, checkpoint: Path) -> TrainingDiverged:
    """The error for a loss (``loss_value``; None: the parameters) that became NaN or
    infinite at ``batch`` of ``epoch``; ``saved_position`` is (epochs, batches) of the
    checkpoint on disk, None if none was written."""
    on_disk = checkpoint if saved_position is not None else None
    what = (f"the loss became {float(loss_value)}" if loss_value is not None
            else "the parameters became NaN or infinite")
    kept = (f"the last good checkpoint ({saved_position[0]} epochs"
            f"{f', {saved_position[1]} batches' if saved_position[1] else ''})"
            f" is kept at {on_disk}" if on_disk else "no checkpoint had been written yet")
    return TrainingDiverged(
        f"training diverged: {what} at epoch {epoch}, batch {batch} of "
        f"{batches_per_epoch}; stopped without saving; {kept}. Try a smaller lr "
        f"(--lr) or gradient clipping (--clip-norm).", epoch, batch, on_disk)


def interrupted(position: tuple[int, int], checkpoint: Path | None,
                in_update: bool) -> TrainingInterrupted:
    """The error for a Ctrl-C whose resumable position is ``position`` (epochs, batches),
    saved in ``checkpoint`` (None: nothing on disk); ``in_update``: it landed inside an
    optimizer update, so the checkpoint is the one written before."""
    if in_update:
        detail = ("interrupted inside an optimizer update; kept the checkpoint on disk"
                  f" ({checkpoint}, {position[0]} epochs done)" if checkpoint
                  else "interrupted inside an optimizer update before any checkpoint")
    else:
        detail = (f"saved {checkpoint} after {position[0]} epochs"
                  + (f" and {position[1]} batches" if position[1] else ""))
    hint = " Continue with --resume (Trainer.resume)." if checkpoint else ""
    return TrainingInterrupted(f"training interrupted: {detail}.{hint}", checkpoint, *position)
