"""What sft may replace and delete in a folder, decided by a record of what it wrote, never by names.

Three rules:

* **A manifest.** A folder sft writes into (a run directory, prepare's output folder, the folder
  of a single output file) holds ``.sft-manifest.json``: every file and folder sft created there,
  with its size and sha256 (of the whole file up to 64 MiB, of its first and last MiB beyond).
  sft deletes or replaces an entry only while it is listed and still matches; anything else (a
  user's ``eval/``, ``vocab.json``, a file edited since) is the user's and stays.
* **One writer.** A command writing into a run directory holds an exclusive ``flock`` on its
  ``.sft-lock`` for its whole life (the kernel releases it on any exit, kill -9 included); a
  second writer is refused naming the holder's pid.
* **An input is never an output.** :func:`check_output` refuses an output path that is one of the
  command's inputs, that is not a regular file (a device, a FIFO), or that holds a file sft did
  not write there (unless ``--force``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sft.errors import ConfigError
from sft.files import atomic_write_text

MANIFEST_FILE = ".sft-manifest.json"
LOCK_FILE = ".sft-lock"
MANIFEST_VERSION = 1
WHOLE_HASH_LIMIT = 64 << 20
SAMPLE = 1 << 20


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file (beyond WHOLE_HASH_LIMIT, of its size, first and last MiB)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= WHOLE_HASH_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(handle.read(SAMPLE))
            handle.seek(size - SAMPLE)
            digest.update(handle.read(SAMPLE))
    return {"size": size, "sha256": digest.hexdigest()}


def _describe(path: Path) -> dict[str, Any] | None:
    """A manifest entry for what is at ``path`` now (None for nothing, or a symlink: never ours)."""
    if path.is_symlink() or not path.exists():
        return None
    if path.is_file():
        return {"kind": "file", **fingerprint(path)}
    files = {}
    for directory, _, names in os.walk(path):
        for name in names:
            file = Path(directory, name)
            if file.is_file() and not file.is_symlink():
                files[file.relative_to(path).as_posix()] = fingerprint(file)
    return {"kind": "dir", "files": files}


def _matches(path: Path, expected: dict[str, Any]) -> bool:
    try:
        return (path.is_file() and not path.is_symlink()
                and fingerprint(path) == {key: expected.get(key) for key in ("size", "sha256")})
    except OSError:
        return False


def _plain_relative(name: Any) -> bool:
    """A name inside the folder: relative, without ``..`` (an edited manifest names nothing outside)."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _valid_entry(name: Any, entry: Any) -> bool:
    if not _plain_relative(name):
        return False
    if entry is None:
        return True
    if not isinstance(entry, dict) or entry.get("kind") not in ("file", "dir"):
        return False
    files = entry.get("files", {})
    return isinstance(files, dict) and all(_plain_relative(relative) and isinstance(value, dict)
                                           for relative, value in files.items())


def _inside(folder: Path, path: Path) -> bool:
    """Whether ``path`` really lies in ``folder`` (no symlinked folder on the way leads out)."""
    return path.parent.resolve().is_relative_to(folder.resolve())


class Manifest:
    """The entries sft created in ``folder`` (relative names), each described as it was written;
    an entry described as None was claimed (about to be written) and not yet recorded."""

    def __init__(self, folder: Path, entries: dict[str, dict[str, Any] | None], found: bool) -> None:
        self.folder = folder
        self.entries = entries
        self.found = found
        """Whether the folder had a manifest (False: none yet, or a run of an older sft)."""

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(folder, {}, found=False)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); sft cannot tell which files there it wrote. Move "
                              f"the folder's files you want to keep, delete {path}, and run again") from None
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or not all(_valid_entry(name, value) for name, value in entries.items()):
            raise ConfigError(f"{path}: not an sft manifest; move the folder's files you want to keep, delete "
                              f"{path}, and run again")
        return cls(folder, entries, found=True)

    def save(self) -> None:
        atomic_write_text(self.folder / MANIFEST_FILE,
                          json.dumps({"version": MANIFEST_VERSION, "entries": self.entries}, indent=1) + "\n")
        self.found = True

    def claim(self, *names: str) -> None:
        """Mark ``names`` as about to be written, so a kill before :meth:`record` still leaves them ours."""
        for name in names:
            self.entries.setdefault(name, None)
        self.save()

    def _listed_folder(self, name: str) -> str | None:
        """The folder entry ``name`` lies in (``eval`` for ``eval/report.md``), if one is listed."""
        parts = Path(name).parts
        for depth in range(1, len(parts)):
            folder = Path(*parts[:depth]).as_posix()
            entry = self.entries.get(folder, {})
            if entry is not None and entry.get("kind") == "dir":
                return folder
        return None

    def record(self, *names: str) -> None:
        """Describe what ``names`` hold now, as written by sft (a name inside a listed folder: that
        folder, described anew)."""
        names = tuple(dict.fromkeys(self._listed_folder(name) or name for name in names))
        for name in names:
            described = _describe(self.folder / name)
            if described is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = described
        self.save()

    def owns(self, name: str) -> bool:
        """Whether the entry ``name`` is one sft wrote and nobody changed since (a folder: every file
        listed is as written, and nothing was added)."""
        if name not in self.entries:
            folder = self._listed_folder(name)
            expected = self.entries[folder]["files"].get(Path(name).relative_to(folder).as_posix()) if folder else None
            return expected is not None and _matches(self.folder / name, expected)
        path, entry = self.folder / name, self.entries[name]
        if entry is None:
            return path.exists() and not path.is_symlink()
        if entry["kind"] == "file":
            return _matches(path, entry)
        return _describe(path) == entry

    def present(self) -> list[str]:
        """The listed entries still there."""
        return [name for name in self.entries if os.path.lexists(self.folder / name)]

    def delete(self, name: str, changed_too: bool = False) -> list[Path]:
        """Delete the entry ``name`` as far as it is as sft wrote it; return what stays (files changed
        or added since, and the folders holding them). A claimed entry never recorded (its writer
        was killed) is deleted whole. ``changed_too``: in a folder sft created, the files it listed
        go even if changed (a damaged checkpoint the run replaces or rotates); added files stay."""
        path, entry = self.folder / name, self.entries.get(name)
        kept: list[Path] = []
        if path.is_symlink() or not _inside(self.folder, path):
            kept.append(path)
        elif entry is None:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        elif entry["kind"] == "file":
            if _matches(path, entry):
                path.unlink()
            elif path.exists():
                kept.append(path)
        elif path.is_dir():
            for relative, expected in entry["files"].items():
                file = path / relative
                if not _inside(path, file):
                    continue
                if (changed_too and file.is_file() and not file.is_symlink()) or _matches(file, expected):
                    file.unlink()
            for directory, _, _ in sorted(os.walk(path), key=lambda item: -len(item[0])):  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            if path.exists():
                kept.append(path)
        self.entries.pop(name, None)
        return kept

    def delete_all(self) -> list[Path]:
        """Delete every entry as far as it is as written; return what stays. The manifest is saved."""
        kept = [path for name in list(self.entries) for path in self.delete(name)]
        self.save()
        return kept


def remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove staging folders named ``PREFIX...`` that a killed writer left; call holding the lock,
    so none of them can be a live writer's."""
    for entry in folder.glob(f"{prefix}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive writer lock of ``folder`` (which must exist) while the block runs; a
    second writer is refused naming the holder's pid. The lock file is removed when the block
    ends (a killed holder's stays, unlocked, for the next writer to take). Where the file system
    cannot lock (or the folder is read-only) the block runs unlocked: the write itself then says
    what is wrong."""
    path = Path(folder) / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # no locks on this file system (some network mounts): run unlocked
                yield
                return
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{folder}: another sft process (pid {holder}) is writing into it; wait until it "
                              f"ends, or choose another directory") from None
        try:  # locked; but if the holder before us removed the file meanwhile, ours is not the lock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a writer waiting on this file tries again
        os.close(fd)


def _same_file(path: Path, other: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def check_output(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = (),
                 force: bool = False, flag: str = "--out", root: str | os.PathLike[str] | None = None) -> None:
    """Refuse to write ``path`` when it is one of ``inputs``, is not a regular file (a device, a
    FIFO, a folder), or holds a file sft did not write there (by the manifest of ``root``, by
    default its folder's) unless ``force``; called before any work."""
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise ConfigError(f"{flag}: {path} is also an input of this command ({source}); writing it would "
                              f"destroy the input. Choose another output path")
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file():
        kind = "a folder" if path.is_dir() else "a symbolic link" if path.is_symlink() else "not a regular file"
        raise ConfigError(f"{flag}: {path} is {kind}; sft replaces only regular files it wrote. Choose another "
                          f"output path")
    root = Path(root) if root is not None else path.parent
    if not force and not Manifest.load(root).owns(path.relative_to(root).as_posix()):
        raise ConfigError(f"{flag}: {path} exists and was not written by sft (or changed since); pass --force to "
                          f"replace it, or choose another output path")


def check_outputs(paths: Sequence[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str] | None] = (),
                  force: bool = False, flag: str = "--out", root: str | os.PathLike[str] | None = None) -> None:
    inputs = list(inputs)
    for path in paths:
        check_output(path, inputs, force, flag, root)


@contextlib.contextmanager
def writing_into(root: str | os.PathLike[str], names: Sequence[str],
                 inputs: Iterable[str | os.PathLike[str] | None] = (), force: bool = False,
                 flag: str = "--out") -> Iterator[Path]:
    """Write the files ``names`` (relative to ``root``, in one subfolder at most) as one writer:
    ``root`` is locked while the block runs, the outputs are checked first (:func:`check_output`),
    and what the block wrote is listed in ``root``'s manifest (a subfolder it created, whole)."""
    root = Path(root)
    created = not os.path.lexists(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with writer_lock(root):
            check_outputs([root / name for name in names], inputs, force, flag, root)
            new_folders = {Path(name).parts[0] for name in names if len(Path(name).parts) > 1
                           and not os.path.lexists(root / Path(name).parts[0])}
            yield root
            manifest = Manifest.load(root)
            manifest.record(*new_folders, *(name for name in names if Path(name).parts[0] not in new_folders
                                            and (root / name).exists()))
    finally:
        if created:  # a command that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                root.rmdir()


def record_outputs(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Note in each folder's manifest that sft wrote ``paths`` (as they are now)."""
    by_folder: dict[Path, list[str]] = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, []).append(path.name)
    for folder, names in by_folder.items():
        Manifest.load(folder).record(*names)
