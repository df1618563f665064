"""Atomic file writes: a temp file in the same folder, fsync, ``os.replace``, fsync of the folder.

A crash or a full disk at any moment leaves either the old file or the new one, never a torn one.
Every file cifarkit writes goes through here (checkpoints, metrics, configs, exports, the data
cache, plots). The module imports nothing from cifarkit but the leaf ``errors`` module, so any
module can use it without an import cycle.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import CifarkitError


def temp_beside(path: Path, suffix: str = ".tmp") -> str:
    """A new empty file next to ``path`` (same folder, so the final rename is atomic).

    Temp files left by a writer that was killed are swept first: they are named ``.NAME.*SUFFIX``.
    """
    path = Path(path)
    folder = path.parent   # Path("name").parent is Path("."): a bare name writes into the current folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{path.name}.*{suffix}"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    except OSError as exc:
        raise CifarkitError(f"cannot write {path}: {exc.strerror or exc}",
                            "choose a writable folder with free space (e.g. --out elsewhere)")
    return tmp


def commit(tmp: str, path: Path) -> None:
    """Make the finished temp file durable and move it onto ``path`` (then make the rename durable)."""
    path = Path(path)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:   # some file systems cannot fsync a folder; the rename itself is still atomic
        pass


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def write(path: Path, write_to: Callable[[Any], Any]) -> None:
    """Call ``write_to(binary_file)`` on a temp file beside ``path``, then commit it."""
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write_to(f)
        commit(tmp, path)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError):
            raise CifarkitError(f"cannot write {path}: {exc.strerror or exc}",
                                "free some disk space or choose another folder; the previous file "
                                "(if any) is untouched") from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    write(path, lambda f: f.write(data))


def torch_save(obj: Any, path: Path) -> None:
    import torch
    write(path, lambda f: torch.save(obj, f))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
