"""The files a ``vae-np`` command writes: checked before any work, against what it reads.

:func:`check_output` is called by every subcommand (and ``vae-np train`` for its
``--out`` folder, through :func:`vae_np.train.check_out_dir`) before the model or the data
is loaded, so that nothing a user types replaces an input or fails only after the work:

* an output that is, or resolves to (symbolic links, ``..``, hard links), a file the
  command reads (the checkpoint, the data set), or that lies inside a folder it reads
  (an image-folder data set), is refused;
* its suffix must name a format the command writes (``--out s.pdf`` writes PDF,
  ``--out s.gif`` is refused rather than given PNG bytes);
* a directory, a path under a regular file, a symbolic link that loops or dangles, or a
  folder that cannot be written is refused with one sentence naming the path.

The picture formats a suffix may name live here too (:data:`PICTURE_FORMATS`,
:func:`figure_bytes`): :mod:`vae_np.plotting` writes what the suffix says. A leaf: it
imports nothing from the package.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

__all__ = ["PICTURE_FORMATS", "check_output", "figure_bytes", "picture_format",
           "same_or_inside"]

#: The picture formats a path's suffix may ask for, and the matplotlib format written.
PICTURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg"}


def picture_format(path: str | os.PathLike) -> str:
    """The format ``path``'s suffix names; ValueError for one that is not a picture's."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_FORMATS:
        raise ValueError(f"path: {path} asks for a {suffix or 'suffix-less'!r} picture; "
                         f"pictures are written as {', '.join(PICTURE_FORMATS)}")
    return PICTURE_FORMATS[suffix]


def figure_bytes(fig, path: str | os.PathLike, dpi: float) -> bytes:
    """A matplotlib Figure drawn in memory in the format ``path``'s suffix names (a
    temporary file's name has none): written afterwards, the file lives only while the
    bytes are copied, so a killed process leaves no empty picture behind for long."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=picture_format(path), dpi=dpi)
    return buffer.getvalue()


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))  # never raises; follows every link it can


def same_or_inside(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether ``path`` is the file ``other`` (same resolved path or same inode) or lies
    inside the folder ``other``."""
    path, other = Path(path), Path(other)
    try:
        if path.exists() and other.exists() and os.path.samefile(path, other):
            return True
    except OSError:
        pass
    real, real_other = _real(path), _real(other)
    return real == real_other or (other.is_dir() and real_other in real.parents)


def check_output(flag: str, path: str | os.PathLike, *,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                 suffixes: Iterable[str] | None = None) -> Path:
    """``path`` as a Path, after checking that the command may write it (the module
    docstring lists the rules).

    ``flag`` names the option in messages (``--out``, ``--json``); ``inputs`` are
    (what, path) pairs the command reads (a None path is skipped; ``mnist`` is no path);
    ``suffixes`` the accepted endings, lower case with the dot (None: any).

    Raises ValueError (an input would be replaced, a suffix of another format) and
    OSError subclasses (a directory, a path under a file, a broken link, not writable),
    each naming ``flag`` and the path.
    """
    path = Path(path)
    suffixes = None if suffixes is None else tuple(suffixes)
    for what, source in inputs:
        if source is None or os.fspath(source) == "mnist":
            continue
        if same_or_inside(path, source):
            where = "is" if not Path(source).is_dir() else "lies in"
            raise ValueError(f"{flag}: {path} {where} the {what} this command reads "
                             f"({source}); writing it would destroy that input; choose "
                             f"another file")
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{flag}: {path} is a symbolic link to "
                                f"{os.readlink(path)!r}, which loops or does not exist; "
                                f"remove it or choose another file")
    if path.is_dir():
        raise IsADirectoryError(f"{flag}: {path} is a directory; give a file name "
                                f"(such as {path / ('out' + (suffixes[0] if suffixes else ''))})")
    if suffixes is not None:
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{flag}: {path} would not be written in the format its name "
                             f"says; this command writes {', '.join(suffixes)} files (got "
                             f"{path.suffix or 'no suffix'!r})")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:  # exists() is False under a file
        if probe.is_symlink():
            raise FileNotFoundError(f"{flag}: {probe} (above {path}) is a symbolic link "
                                    f"that loops or dangles; choose another path")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{flag}: {path} lies under {probe}, which is a file, not "
                                 f"a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}: cannot write to the folder {probe}"
                              + ("" if probe == path.parent else f" to create {path.parent}"))
    return path
