"""Writing outputs safely: the one boundary every writing command goes through.

Rules a command gets by using these helpers (call ``check_output_path`` before any
work, then write with ``atomic_path``/``atomic_write_text``/``atomic_write_bytes``):

- **Never over an input.** ``check_output_path(out, *inputs)`` refuses an output that
  is one of the command's inputs: the same path, a symlink to it or a hard link (same
  device and inode), or a folder that contains one (``bundle --force`` replaces folders).
- **Validated before work, nothing created.** ``check_output_path`` also refuses an
  output that is an existing directory, or whose nearest existing ancestor is a file,
  unwritable, or on a read-only file system; it creates no folder.  ``check_outputs``
  does it for several outputs at once (and refuses two that coincide).
- **Atomic, and nothing left behind.** ``atomic_path`` writes to a temp file beside the
  target and renames it into place on success; missing folders are created at that first
  real write and removed again (if still empty) when the write fails or is interrupted.
  Commands writing several files through a temp folder (export, bundle) use
  ``created_dirs`` (or ``make_output_dirs`` + ``remove_empty_dirs`` in a ``finally``).
- **Environment errors are the user's, exit 2.** Any ``OSError`` while writing (disk full,
  read-only file system, permission denied, is a directory, ...) becomes an
  :class:`~edgesr.errors.OutputError` naming the path and the reason; ``writing(path)``
  applies the same rule to writes that do not go through ``atomic_path``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- error classification


def output_error(path: PathLike, e: OSError) -> OutputError:
    """``e`` raised while writing ``path`` as a one-line user error: path and reason."""
    reason = e.strerror or str(e) or type(e).__name__
    where = e.filename if e.filename and str(e.filename) != str(path) else None
    detail = f" ({where})" if where else ""
    return OutputError(f"cannot write {path}: {reason}{detail}")


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[None]:
    """Classify OSErrors raised while writing ``path`` (ENOSPC, EROFS, EACCES, EISDIR...)."""
    try:
        yield
    except OSError as e:
        raise output_error(path, e) from None


# --------------------------------------------------------------------------- validation before work


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: equal after resolving symlinks, or the same inode."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.resolve() == pb.resolve():
            return True
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def _contains(directory: Path, path: Path) -> bool:
    try:
        return directory.is_dir() and path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def refuse_output_overlapping_inputs(output: PathLike, *inputs: PathLike | None) -> None:
    """Raise OutputError when ``output`` would overwrite (or replace a folder holding) an input."""
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        inp = Path(given)
        if same_file(out, inp):
            raise OutputError(f"refusing to write {out}: it is the input {inp}; choose another output path")
        if _contains(out, inp):
            raise OutputError(f"refusing to write {out}: it contains the input {inp}; choose another output path")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_writable_destination(path: PathLike, directory: bool = False) -> Path:
    """Raise OutputError unless ``path`` can be created; creates nothing.

    ``directory``: the output is a folder (then an existing folder is fine).
    """
    p = Path(path)
    if p.is_dir() and not directory:
        raise OutputError(f"cannot write {p}: it is a directory")
    if p.exists() and directory and not p.is_dir():
        raise OutputError(f"cannot write {p}: it exists and is not a directory")
    anchor = _nearest_existing(p.parent if not p.exists() or not directory else p)
    if not anchor.is_dir():
        raise OutputError(f"cannot write {p}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(anchor) else "permission denied"
        raise OutputError(f"cannot write {p}: {reason} ({anchor})")
    return p


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_path(output: PathLike, *inputs: PathLike | None, directory: bool = False) -> Path:
    """Everything to check about an output before any work: not an input, and writable.

    Call it in a command before loading a model or running anything; ``inputs`` are the
    files the command reads (checkpoint, artifact, images...).  Returns ``Path(output)``.
    """
    path = check_writable_destination(output, directory=directory)
    refuse_output_overlapping_inputs(output, *inputs)
    return path


def check_outputs(outputs, *inputs: PathLike | None) -> list[Path]:
    """``check_output_path`` for each given output (None skipped); two outputs may not coincide either."""
    given = [Path(o) for o in outputs if o is not None]
    for i, out in enumerate(given):
        check_output_path(out, *inputs)
        for other in given[:i]:
            if same_file(out, other):
                raise OutputError(f"two outputs are the same file: {other} and {out}")
    return given


# --------------------------------------------------------------------------- writing


def make_output_dirs(directory: PathLike) -> list[Path]:
    """Create ``directory`` and missing parents; return the ones created, deepest first.

    Pair it with ``remove_empty_dirs`` in a ``finally``: output folders appear with the
    first real output and go again, if still empty, when the command fails or is interrupted.
    """
    d = Path(directory) if str(directory) else Path(".")
    made: list[Path] = []
    p = d.absolute()
    while not os.path.lexists(p):
        made.append(p)
        p = p.parent
    with writing(d):
        d.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove those of ``dirs`` (deepest first) that are empty; keep any holding a file."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def created_dirs(directory: PathLike) -> Iterator[Path]:
    """``make_output_dirs`` for a block: what it created is removed again if still empty afterwards."""
    made = make_output_dirs(directory)
    try:
        yield Path(directory) if str(directory) else Path(".")
    finally:
        remove_empty_dirs(made)


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` (kept by exporters that write into an existing temp folder)."""
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise OutputError(f"output directory is not writable: {directory}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    OSErrors inside the block and around it become OutputError (path + reason); the temp
    file and any folder created for it are removed on failure, Ctrl-C and SIGTERM.
    """
    final = Path(path)
    if final.is_dir():
        raise OutputError(f"cannot write {final}: it is a directory")
    with created_dirs(final.parent), writing(final):
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            if tmp_path.exists():
                # mkstemp creates 0600; give the artifact the permissions a plain open() would.
                os.chmod(tmp_path, 0o666 & ~umask())
            os.replace(tmp_path, final)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data``; serialise in memory first so a full disk surfaces as an OSError here."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
