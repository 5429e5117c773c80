"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The data goes to a hidden temporary file in the target's directory, is flushed to disk, and
replaces the target with ``os.replace`` (atomic on POSIX and Windows within one file system).
A crash mid-write leaves at most a stray ``.NAME.tmp-*`` file, which nothing ever loads. The
file gets the permissions of any new file (0666 less the umask), as a plain ``open(path, 'wb')``
would give it, so the group's readers of a shared work dir can read the checkpoints.
"""
import contextlib
import os
import os.path as osp
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator, Tuple, Union

import torch
from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'atomic_local'


def atomic_write(path: Union[str, Path], data: Union[bytes, str], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` atomically (creating the directory if needed).

    Raises:
        IsADirectoryError: ``path`` is a directory (checked before anything is written).
    """
    if isinstance(data, str):
        data = data.encode(encoding)
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[BinaryIO]:
    """A binary file object to write ``path``'s new contents to (in its directory, created if
    needed): a ``with`` block that ends normally flushes it to disk and puts it in place of
    ``path``; one that raises leaves ``path`` as it was and removes the temporary file.

    Raises:
        IsADirectoryError: ``path`` is a directory (checked before anything is written).
    """
    with _temp_beside(path) as (fd, tmp):
        try:
            f = os.fdopen(fd, 'wb')
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        move_into_place(tmp, path)


@contextlib.contextmanager
def temp_file_beside(path: Union[str, Path]) -> Iterator[str]:
    """A new, empty, hidden file (``.NAME.tmp-*``) in the directory of ``path`` (created if
    needed), for a writer that takes a path, not a file object (else :func:`atomic_file`);
    :func:`move_into_place` then puts it under its real name. The file is removed on leaving
    the ``with`` block if it is still there, whatever stopped the writer (an exception, Ctrl-C).

    Yields:
        str: the temporary file's path.

    Raises:
        IsADirectoryError: ``path`` is a directory (checked before anything is written).
    """
    with _temp_beside(path) as (fd, tmp):
        os.close(fd)
        yield tmp


@contextlib.contextmanager
def _temp_beside(path: Union[str, Path]) -> Iterator[Tuple[int, str]]:
    """(open descriptor, name) of a new hidden file beside ``path``, removed on leaving if it
    is still there; the caller closes the descriptor."""
    path = osp.abspath(path)
    if osp.isdir(path):
        raise IsADirectoryError(f'{path} is a directory: name the file to write (in it, or '
                                'elsewhere)')
    os.makedirs(osp.dirname(path), exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        yield fd, tmp
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def move_into_place(src: str, path: Union[str, Path]) -> None:
    """Rename the finished file ``src`` to ``path`` (same file system), replacing any file
    there in one step, and persist the rename."""
    path = osp.abspath(path)
    os.replace(src, path)
    _fsync_dir(osp.dirname(path))


def _new_temp_file(path: str):
    """(fd, name) of a new file beside ``path``, opened for writing with mode 0666 less the
    umask (``tempfile.mkstemp`` would give 0600, which ``os.replace`` keeps)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
    while True:
        tmp = f'{osp.dirname(path)}/.{osp.basename(path)}.tmp-{secrets.token_hex(6)}'
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_torch_save(obj, path: Union[str, Path]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_file` (streamed: no second copy of the
    checkpoint in memory)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


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
