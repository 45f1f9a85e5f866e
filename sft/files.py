"""Writing files so that a crash, a kill or a full disk never leaves a half-written one, and
telling a damaged file (written by other tools, or cut short by a full disk) before it is used.

Every output is written under a temporary name in the same directory, flushed to disk (fsync),
then renamed into place, and the directory is synced so the rename itself survives a power cut.
A failure removes the temporary file or folder (and only it) and leaves what was there before.
A writer killed outright (kill -9) cannot; its temporary, ``.NAME.HOST-PID-RANDOM.tmp``, is
removed by the next writer of the same name once that process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(directory)


HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
"""Which machine wrote a temporary: a process id means something only on the machine that
issued it (a folder may be shared over a network)."""
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries beside ``path`` that a killed writer of ``path`` left: those named
    ``.NAME.HOST-PID-RANDOM.tmp`` for this name, written on this machine by a process that is no
    longer alive. A live writer's temporary, another machine's, or any other file is left alone."""
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = TEMPORARY_NAME.match(sibling.name)
        if (match is None or match["name"] != path.name or match["host"] != HOST_TAG
                or _process_alive(int(match["pid"]))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()
        removed.append(sibling)
    return removed


def _temporary_beside(path: Path, create: Callable[[Path], T]) -> tuple[T, Path]:
    """``create(name)`` for a fresh name ``.NAME.HOST-PID-RANDOM.tmp`` beside ``path`` (``create``
    fails with FileExistsError on a taken name), after removing the temporaries a killed writer of
    the same name left there (:func:`remove_stale_temporaries`).

    The entries are made with the permissions a plain ``open`` or ``mkdir`` gives (0666 or 0777
    less the umask), not mkstemp's 0600: the outputs are the user's, to share as any other file."""
    remove_stale_temporaries(path)
    while True:
        temporary = path.with_name(f".{path.name}.{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return create(temporary), temporary
        except FileExistsError:
            continue


def unwritable_reason(directory: str | os.PathLike[str], create: bool = False) -> str | None:
    """Why no file can be created in ``directory`` (missing, not a directory, read-only, ...),
    or None when one can; with ``create`` the directory and its parents are made first. Commands
    ask before their long work (loading a model, training), not when they come to save."""
    directory = Path(directory)
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd, probe = _temporary_beside(directory / ".write-check", lambda name: os.open(name, NEW_FILE, 0o666))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """A fresh temporary path beside each of ``paths``, for writers that open their file
    themselves; when the block ends without an error, all are synced and only then renamed into
    place, one after the other. On an error they are removed and ``paths`` stay as they were.

    Files that belong together (a train/validation split and its report) are thus replaced as a
    set: a full disk, a crash or an exception while any of them is written leaves the previous
    set whole, never new files beside old ones. Renames need no disk space; a kill between two of
    them is the only window left."""
    paths = [Path(path) for path in paths]
    temporaries: list[Path] = []
    try:
        for path in paths:
            try:
                fd, temporary = _temporary_beside(path, lambda name: os.open(name, NEW_FILE, 0o666))
            except OSError as exc:  # name the file asked for, not the hidden temporary one
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            os.close(fd)
            temporaries.append(temporary)
        yield temporaries
        for temporary in temporaries:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
    except BaseException as exc:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: say where
            reason = exc.strerror or f"a write failed ({exc}); is the disk full?"  # numpy's tofile has no errno
            raise OSError(exc.errno, reason, str(paths[0].parent)) from exc
        raise
    for directory in {path.parent for path in paths}:
        fsync_directory(directory)


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike[str]], mode: str = "w",
                 encoding: str | None = "utf-8") -> Iterator[list[IO]]:
    """:func:`atomic_paths`, opened: one handle per path, written as a set."""
    text = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
    with atomic_paths(paths) as temporaries, contextlib.ExitStack() as handles:
        yield [handles.enter_context(open(temporary, mode, **text)) for temporary in temporaries]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    with atomic_files([path], mode, encoding) as (handle,):
        yield handle


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary directory beside ``target`` to fill; on success it is renamed to
    ``target``, which must not exist or be an empty directory. Nothing else is ever deleted."""
    target = Path(target)
    _, staging = _temporary_beside(target, lambda name: os.mkdir(name, 0o777))
    try:
        yield staging
        fsync_tree(staging)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(target.parent)


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file (missing, truncated, not safetensors), naming it; None
    when its header parses and every tensor it lists lies within the file. Reads the header only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_size > size:
                return f"{path}: truncated or not safetensors ({size} bytes, a header of {header_size} announced)"
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, struct.error, ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
        return f"{path}: truncated or corrupt ({type(exc).__name__}: {exc})"
    if 8 + header_size + end > size:
        return f"{path}: truncated ({size} bytes, {8 + header_size + end} expected)"
    return None


def sha256_of_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """One sha256 over the names and contents of ``paths``, in order: what a small artifact (an
    adapter) is identified by where a path alone could name retrained weights."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        digest.update(path.name.encode())
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
