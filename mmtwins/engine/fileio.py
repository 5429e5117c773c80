"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The data goes to a hidden temporary file in the target's directory, is flushed to disk, and
replaces the target with ``os.replace`` (atomic on POSIX and Windows within one file system).
A crash mid-write leaves at most a stray ``.NAME.tmp-*`` file, which nothing ever loads.
"""
import io
import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import Union

import torch
from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'atomic_local'


def atomic_write(path: Union[str, Path], data: Union[bytes, str], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` atomically (creating the directory if needed)."""
    path = osp.abspath(path)
    directory = osp.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode(encoding)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.tmp-', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj, path: Union[str, Path]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@register_backend(ATOMIC_BACKEND)
class AtomicLocalBackend(LocalBackend):
    """MMEngine's local file backend with atomic ``put``/``put_text``.

    Selected with ``backend_args=dict(backend='atomic_local')``, e.g. in a ``CheckpointHook``:
    every checkpoint ``runner.save_checkpoint`` writes through it is then atomic.
    """

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj, encoding)
