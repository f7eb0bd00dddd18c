"""The output directory of a run: checked before any work, and held by one run at a time.

:func:`check_out_dir` fails fast (before data is loaded or an epoch is trained) when the
run could not write its files: ``out_dir`` under a regular file, a regular file itself,
not writable, or one of the run's file names taken by a directory.

:class:`OutDirLock` keeps two runs from mixing their files in one ``out_dir``: the run
that holds ``out_dir/.lock`` (created with O_CREAT | O_EXCL, so exactly one creator wins)
writes there; a second one gets :class:`OutDirInUse`. The lock holds the owner's pid and
host name and is removed on exit, exceptions and Ctrl-C included. A process killed
outright (SIGKILL, power loss) leaves it behind; the next run on the same host sees that
the pid is gone, says so and takes the lock over. A lock from another host, or one whose
pid is alive (possibly reused by an unrelated process), is never taken over: the message
says which file to delete if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from ..outputs import same_or_inside
from .metrics import METRICS_FILE, RESULTS_FILE
from .pictures import PICTURE_FILES
from .state import CHECKPOINT_FILE

__all__ = ["LOCK_FILE", "OutDirInUse", "OutDirLock", "check_out_dir"]

LOCK_FILE = ".lock"

# Every file a run writes in out_dir, with what it is (for messages).
_RUN_FILES = {CHECKPOINT_FILE: "checkpoint", METRICS_FILE: "metrics", RESULTS_FILE: "results",
              LOCK_FILE: "lock", **{name: "picture" for name in PICTURE_FILES}}


def check_out_dir(out_dir: str | os.PathLike, *, new_run: bool = False,
                  overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """``out_dir`` as a Path, after checking that a run can write its files there.

    It need not exist yet; the nearest existing ancestor must then be a writable
    directory. With ``new_run`` and not ``overwrite``, an existing checkpoint (a run to
    resume, not to clobber) is refused too. ``inputs`` are the data set's file or
    folder (None and ``mnist`` are skipped): out_dir must not be, or lie inside, an input
    folder (the run's pictures would join the images), nor may a run file be an input.
    Nothing is created.

    Raises (each naming ``out_dir`` and the path at fault): NotADirectoryError (out_dir,
    or a directory above it, is a file), IsADirectoryError (a run file's name is taken by
    a directory or other non-file), PermissionError (not writable), FileExistsError (a
    checkpoint is there and a new run would replace it), FileNotFoundError (out_dir or
    a folder above it is a symbolic link that loops or dangles), ValueError (an input).
    """
    path = Path(out_dir)
    for source in inputs:
        if source is None or os.fspath(source) == "mnist":
            continue
        if same_or_inside(path, source) or any(same_or_inside(path / name, source)
                                               for name in _RUN_FILES):
            raise ValueError(f"out_dir: {path} would write the run's files over or into the "
                             f"data set {source} (--dataset); choose another out_dir (--out)")
    probe = path
    while not probe.exists() and probe != probe.parent:  # exists() is False under a file
        if probe.is_symlink():  # mkdir would fail on it with a bare "File exists"
            raise FileNotFoundError(f"out_dir: {probe} is a symbolic link to "
                                    f"{os.readlink(probe)!r}, which loops or does not exist"
                                    f"{'' if probe == path else f' (above {path})'}; remove "
                                    f"it or choose another out_dir (--out)")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under {probe}, which is a file"
        raise NotADirectoryError(f"out_dir: {path} {where}, not a directory; choose "
                                 f"another out_dir (--out)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir: cannot write to {probe}"
                              + ("" if probe == path else f" to create {path}"))
    if probe == path:
        for name, what in _RUN_FILES.items():
            entry = path / name
            if (entry.exists() or entry.is_symlink()) and not entry.is_file():
                raise IsADirectoryError(
                    f"out_dir: {entry} is not a regular file (a directory?), but the run "
                    f"writes its {what} file there; move it away or choose another out_dir")
        if new_run and not overwrite and (path / CHECKPOINT_FILE).exists():
            raise FileExistsError(
                f"out_dir: {path / CHECKPOINT_FILE} already exists; resume that run "
                f"(Trainer.resume, --resume) or start afresh with overwrite=True (--overwrite)")
    return path


class OutDirInUse(RuntimeError):
    """Another run holds ``out_dir``'s lock. Attributes: ``lock_path``, ``pid``, ``host``
    (None when the lock file could not be read)."""

    def __init__(self, message: str, lock_path: Path, pid: int | None, host: str | None):
        super().__init__(message)
        self.lock_path, self.pid, self.host = lock_path, pid, host


# Locks this process holds, by lock file, with their nesting depth: the command line
# holds out_dir from before the data is loaded, and Trainer.fit takes it again inside.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


class OutDirLock:
    """``with OutDirLock(out_dir):`` holds ``out_dir/.lock`` (creating ``out_dir``).

    Re-entrant within one process; raises :class:`OutDirInUse` when another live process
    holds it. ``log`` receives the note when a stale lock is taken over.
    """

    def __init__(self, out_dir: str | os.PathLike,
                 log: Callable[[str], object] | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.log = log
        self._key = os.path.abspath(self.path)

    def __enter__(self) -> "OutDirLock":
        with _held_guard:
            if _held.get(self._key):
                _held[self._key] += 1
                return self
            self._created = not self.out_dir.exists()  # removed again if left empty
            self.out_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._acquire()
            except BaseException:
                self._remove_if_empty()
                raise
            _held[self._key] = 1
            self._remove_stale_temporaries()
        return self

    def __exit__(self, *exc_info) -> None:
        with _held_guard:
            _held[self._key] -= 1
            if _held[self._key]:
                return
            del _held[self._key]
            # Remove only our own lock: after a takeover race it may be another's.
            if _read_owner(self.path) == _me():
                self.path.unlink(missing_ok=True)
            self._remove_if_empty()  # a run that failed before writing anything

    def _remove_if_empty(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                self.out_dir.rmdir()

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary files (``.NAME.*.tmp``, vae_np.checkpoint.atomic_write) of
        this directory's run files: holding the lock, no other run writes them, so they
        are what a killed run (SIGKILL, power loss) left behind."""
        for name in _RUN_FILES:
            for leftover in self.out_dir.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def _acquire(self) -> None:
        for _ in range(3):  # a stale lock removed, then one retry; a third try for races
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                if not self._stale(owner):
                    raise self._in_use(owner) from None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                pid, host = _me()
                fh.write(json.dumps({"pid": pid, "host": host,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            return
        raise self._in_use(_read_owner(self.path))

    def _stale(self, owner: tuple[int, str] | None) -> bool:
        """True (and the lock removed) when ``owner`` is a process of this host that no
        longer runs."""
        if owner is None or owner[1] != socket.gethostname() or _pid_alive(owner[0]):
            return False
        if self.log is not None:
            self.log(f"note: {self.path} was left by process {owner[0]} on {owner[1]}, "
                     f"which is no longer running; taking the lock over")
        # Unlink only if it still names the dead owner (another run may have replaced it).
        if _read_owner(self.path) == owner:
            self.path.unlink(missing_ok=True)
        return True

    def _in_use(self, owner: tuple[int, str] | None) -> OutDirInUse:
        who = (f"process {owner[0]} on {owner[1]}" if owner is not None
               else "another run (its lock file is empty or unreadable: being written?)")
        ranks = _mpiexec_ranks()
        if ranks > 1:  # N copies of one plain run racing for the same --out
            return OutDirInUse(
                f"out_dir: {self.out_dir} is taken by another of the {ranks} processes "
                f"mpiexec started ({who}): each is a separate run; add --distributed for one "
                f"data-parallel run over them", self.path,
                *(owner if owner is not None else (None, None)))
        return OutDirInUse(
            f"out_dir: {self.out_dir} is in use by {who}; wait for that run or choose another "
            f"out_dir (--out). If no run is using it, delete {self.path}", self.path,
            *(owner if owner is not None else (None, None)))


def _mpiexec_ranks() -> int:
    """How many processes mpiexec started alongside this one (MPICH / Open MPI set these
    variables in each), 1 when not under mpiexec."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def _me() -> tuple[int, str]:
    return os.getpid(), socket.gethostname()


def _read_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) from a lock file; None if it is missing, empty or not ours to parse."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        pid, host = record["pid"], record["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(host, str):
        return None
    return pid, host


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (True when it cannot be told)."""
    if os.name != "posix" or pid <= 0:
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: alive, another user's
        return exc.errno != errno.ESRCH
    return True
