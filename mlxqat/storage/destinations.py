"""Where mlxqat may write, and how: the destination rule, atomic replacement, repair of killed writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from .checks import PathLike
from .manifest import MANIFEST, Manifest, listed_files, walk_entries, is_mlxqat_output


class DestinationError(ValueError):
    """An output path that mlxqat must not write: it holds something that is not mlxqat's."""


def _describe(path: Path, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        listed = listed_files(path)
        try:
            names = sorted(n for n, s in walk_entries(path) if not stat.S_ISDIR(s.st_mode) and n not in listed)
        except OSError:
            names = []
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a folder holding files mlxqat did not write ({shown})" if names else "a folder mlxqat did not write"
    if stat.S_ISREG(st.st_mode):
        return "a file mlxqat did not write"
    return "a device or special file"


def _inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or lies under it."""
    return a == b or b in a.parents


def check_destination(dest: PathLike, *, sources: Iterable[PathLike] = (), kind: str = "dir") -> Path:
    """Check that ``dest`` may be (re)written by mlxqat; return it as a Path.

    Args:
        dest: the output path.
        sources: the inputs of the command (the model being read): ``dest`` may be
            neither one of them, nor inside one, nor contain one.
        kind: ``"dir"`` or ``"file"``: what will be written at ``dest``.

    Raises:
        DestinationError: naming the path, what is there and the fix.
    """
    if dest is None or str(dest).strip() == "":
        raise DestinationError("the output path is empty; name a new directory or file, e.g. --out qat-out")
    dest = Path(dest).expanduser()
    recover_interrupted(dest)
    resolved = dest.resolve()
    fix = "choose a new path for the output"
    if _inside(Path.cwd().resolve(), resolved):
        raise DestinationError(
            f"{dest} is the current directory or one of its parents; mlxqat writes its output as a "
            f"new folder and would replace everything there: {fix} (e.g. --out qat-out)"
        )
    for src in sources:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(resolved, s) or _inside(s, resolved):
            raise DestinationError(f"{dest} is (or holds, or lies inside) the source model {src}; {fix}")
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        _check_writable_parent(dest, fix)
        return dest
    wanted = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
    if wanted(st.st_mode) and is_mlxqat_output(dest):
        _check_writable_parent(dest, fix)
        return dest
    what = "directory" if kind == "dir" else "file"
    raise DestinationError(
        f"{dest} already exists and is {_describe(dest, st)}; mlxqat only replaces its own earlier "
        f"outputs, so nothing was written: {fix} (a new {what}), or move {dest} away yourself"
    )


def _check_writable_parent(dest: Path, fix: str) -> None:
    """The folder ``dest`` goes in exists (or can be created) and this process can create files there.

    Tried, not read from permission bits (which root, read-only mounts and /proc
    do not honour): a temporary file is created and removed in the nearest
    existing folder above ``dest``.
    """
    ancestor = Path(os.path.abspath(dest)).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DestinationError(f"{ancestor} is not a directory, so {dest} cannot be created; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=ancestor)
    except OSError as e:
        raise DestinationError(
            f"{dest} cannot be written: {ancestor} is not writable (creating a file there failed: {e.strerror}); "
            f"{fix} in a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _backup_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.mlxqat-old"


# which machine wrote a temporary (processes of one run may share a file system across machines)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(dest: Path) -> str:
    """How the temporary siblings of ``dest`` are named: ``.NAME.tmp-PID@HOST-`` and tempfile's 8 characters.

    The writer's process id and machine let :func:`_remove_stale_temporaries`
    tell a temporary whose writer died from one still being written.
    """
    return f".{dest.name}.tmp-{os.getpid()}@{_HOST}-"


def _process_alive(pid: int) -> bool:
    """False only when no process ``pid`` exists on this machine (when unsure: alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or not a pid at all: leave it
        return True
    return True


def _remove_stale_temporaries(dest: Path) -> list:
    """Remove temporaries of ``dest`` that mlxqat writers on this machine left when they were killed.

    Only names :func:`_temp_prefix` makes for ``dest``, written on this machine
    by a process that no longer exists; anything else (other names, a live
    writer's temporary, older temporaries without a process id) is left alone.

    Returns:
        The names removed.
    """
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.tmp-(\d+)@{_HOST}-[a-z0-9_]{{8}}")
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                _remove(dest.parent / name)
                removed.append(name)
    if removed:
        print(f"note: removed {', '.join(removed)}, left in {dest.parent} by an interrupted write of {dest.name}",
              file=sys.stderr)
    return removed


def recover_interrupted(dest: PathLike) -> Optional[str]:
    """Finish or undo a replacement of ``dest`` that was killed between its two renames.

    Temporaries of ``dest`` whose writer died are removed too (:func:`_remove_stale_temporaries`).

    Returns:
        ``"restored"`` (the old version is back at ``dest``), ``"cleaned"`` (the
        new version was in place; the stale old copy was removed), or None.
    """
    dest = Path(dest)
    _remove_stale_temporaries(dest)
    backup = _backup_path(dest)
    if not os.path.lexists(backup):
        return None
    if not os.path.lexists(dest):
        os.rename(backup, dest)
        print(f"note: restored {dest} from an interrupted replacement ({backup.name})", file=sys.stderr)
        return "restored"
    if is_mlxqat_output(backup):
        _remove(backup)
        return "cleaned"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``, keeping the old ``dest`` until the new one is in place."""
    if os.path.lexists(dest):
        if not is_mlxqat_output(dest):  # changed since it was checked
            raise DestinationError(f"{dest} changed while mlxqat was writing and is no longer its own output; nothing was replaced")
        backup = _backup_path(dest)
        os.rename(dest, backup)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        _remove(backup)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def _naming(dest: Path) -> Iterator[None]:
    """Report an OS error while starting to write ``dest`` as an error about ``dest`` (not a temporary name)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot create {dest} ({e.strerror})", str(dest)) from e


@contextlib.contextmanager
def atomic_dir(dest: PathLike, *, sources: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``dest`` when the body succeeds.

    ``dest`` must pass :func:`check_destination`. If the body raises (or the
    process dies), ``dest`` keeps its previous content or stays absent, and the
    temporary directory is removed (after a kill, left as ``.NAME.tmp-*`` until the
    next write to ``dest`` removes it).
    """
    dest = check_destination(dest, sources=sources, kind="dir")
    with _naming(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(dest: PathLike, *, sources: Iterable[PathLike] = (), check: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file path that becomes ``dest`` when the body succeeds.

    For writers that open files by name (``gguf.GGUFWriter``). ``dest`` must
    pass :func:`check_destination` (unless ``check=False``: a file inside a
    directory mlxqat owns, such as a training work directory).
    """
    dest = check_destination(dest, sources=sources, kind="file") if check else Path(dest)
    if not check:  # check_destination cleans up after killed writers; here, in a directory mlxqat owns, do it now
        _remove_stale_temporaries(dest)
    with _naming(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check and os.path.lexists(dest) and not is_mlxqat_output(dest):
            raise DestinationError(f"{dest} changed while mlxqat was writing; nothing was replaced")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest: PathLike, mode: str = "wb", *, check: bool = True):
    """Open a temporary sibling of ``dest`` for writing; it becomes ``dest`` on success (see :func:`atomic_path`)."""
    with atomic_path(dest, check=check) as tmp:
        with open(tmp, mode) as f:
            yield f


def check_work_dir(path: PathLike, *, sources: Iterable[PathLike] = ()) -> Path:
    """Check that ``path`` may serve as an mlxqat working directory (see :func:`work_dir`); create nothing."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not is_mlxqat_output(path):
        check_destination(path, sources=sources, kind="dir")
    return path


def work_dir(path: PathLike, *, sources: Iterable[PathLike] = ()) -> Path:
    """Create (or reuse) a working directory that mlxqat owns, e.g. ``<out>.train/``.

    It is marked by an ``mlxqat.json`` of kind ``work``; an existing path
    without that mark (unless an empty folder) is refused like any destination.
    The directory appears with its mark already inside (built as a temporary
    sibling, then renamed), so processes of one distributed run that create it
    at the same time all see a marked directory.
    """
    path = check_work_dir(path, sources=sources)
    if (path / MANIFEST).is_file():
        return path
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        (tmp / MANIFEST).write_text(Manifest.work_mark())
        try:
            os.rename(tmp, path)  # replaces an empty folder; fails if another process got there first
        except OSError:
            if not (path / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check_work_dir(path, sources=sources)


def remove_output(path: PathLike) -> None:
    """Delete ``path`` only if it is an mlxqat output (e.g. an old checkpoint); refuse otherwise."""
    path = Path(path)
    if not is_mlxqat_output(path):
        raise DestinationError(f"{path} is not an mlxqat output; it was not deleted")
    _remove(path)


def write_manifest(directory: PathLike, info: Dict[str, Any], *, kind: str = "model") -> dict:
    """Write ``mlxqat.json`` into ``directory`` atomically: ``info``, the sha256 of every other file, a
    self-digest (:class:`~mlxqat.storage.manifest.Manifest`). Returns the manifest as a dict.

    Raises:
        ValueError: ``info`` sets a reserved key or holds NaN/Inf, or the directory holds something
            other than regular files and folders.
    """
    directory = Path(directory)
    manifest = Manifest.for_files(directory, info, kind=kind)
    try:
        text = manifest.text()
    except ValueError as e:
        raise ValueError(f"the manifest of {directory} cannot hold NaN or Inf ({e}); leave such metrics out") from e
    with atomic_file(directory / MANIFEST, "w", check=False) as f:
        f.write(text)
    return manifest.to_dict()
