"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace.

A process killed at any point leaves either the old file or the new one, never a partial file;
checkpoints, result files and figures are all written this way.
"""
import contextlib
import io
import os
import tempfile
from typing import Any

import torch

__all__ = ['atomic_write_bytes', 'atomic_save', 'serialize']


def serialize(obj: Any) -> bytes:
    """The bytes torch.save writes for `obj`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path) + '-', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically."""
    atomic_write_bytes(serialize(obj), str(path))
